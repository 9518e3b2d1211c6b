"""Training-step time and memory of MarginModel relative to cross-entropy.

Builds the small CNN of the paper's MNIST setting (28x28x1 inputs, two 5x5
conv layers of 32 and 64 filters each followed by 2x2 max-pooling, dense 512,
10 classes; batch 64; margin on the input and both pooled outputs) and an MLP
variant (784-512-512-10, margin on the input and both hidden layers), and
times, interleaved in one process, `train_on_batch` of `MarginModel` against
a plain `keras.Model` on the same layers compiled with sparse categorical
cross-entropy, for approximate/exact x competitors (sampled top_k=1, the
default; top-scoring top_k=1 and 9) x norm 2/inf x jit_compile off/on.
Prints a table and a JSON line of ratios (margin step / CE step with the
same jit setting), the peak memory of a few variants relative to CE
(each in a fresh process), and the ratio of a naive per-example, per-class
implementation, the cost of the step's checks (`check_costs`: the
in-step label checks, and the non-finite guard with SGD and with Adam), and
the ratio with the optimizer of `marginfit train` (`train_command_ratios`:
Adam, with and without the weight average), and the evaluation step's
ratio (`evaluation_ratio`, which adds the distances to the boundary), and
the margin composed with the input-gradient penalty against each alone
(`composition_ratios`).
Absolute times alone mean little; quote the ratios.

``--backend tensorflow jax`` instead measures the default step (and the
exact one, and top_k=9) over the CE step on each named Keras backend, each
in its own process (a backend is fixed at import), and prints the ratios
side by side with the device and the absolute step times; it runs on a host
with JAX (or PyTorch) and Keras but no TensorFlow.

    python benchmarks/step_time.py [--repeats 5] [--steps 3] [--quick] [--checks-only]
        [--train-command-only] [--evaluation-only] [--compositions-only]
        [--backend NAME ...]
"""

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "--backend-child" in sys.argv:
    # A backend is fixed when Keras is imported.
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend-child") + 1]

import keras  # noqa: E402
import numpy as np  # noqa: E402

import marginfit  # noqa: E402
from marginfit import networks  # noqa: E402

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 64


def cnn():
    """The paper's MNIST CNN; margin on the input and both pooled outputs."""
    network = networks.classifier(
        (28, 28, 1),
        10,
        conv_filters=(32, 64),
        kernel_size=5,
        dense_units=(512,),
        margin_after_pooling=True,
    )
    return network, ["input", *network.hidden[:2]]


def mlp():
    """784-512-512-10; margin on the input and both hidden layers."""
    network = networks.classifier((28, 28, 1), 10, conv_filters=(), dense_units=(512, 512))
    return network, ["input", *network.hidden]


ARCHITECTURES = {"cnn": cnn, "mlp": mlp}

DEFAULT_MARGIN = dict(approximate=True, competitors="sampled", top_k=1, norm=2)
"""`LargeMargin` options of the default step (the others are its defaults)."""


def build(
    architecture,
    margin_options=None,
    jit_compile=False,
    seed=0,
    on_nonfinite="skip",
    optimizer="sgd",
    ema_momentum=None,
    penalty=None,
    update_rule=None,
):
    """A compiled model; plain `keras.Model` when ``margin_options``,
    ``penalty`` and ``update_rule`` are None; ``penalty(layers)`` gives the
    penalty (or a list).
    ``optimizer``: "sgd" (the cheapest update, so that ratios show the loss)
    or "adam" (the default of `marginfit train`), learning rate 1e-3, with
    Keras' moving average of the weights if ``ema_momentum`` is given."""
    keras.utils.set_random_seed(seed)
    network, layers = ARCHITECTURES[architecture]()
    if margin_options is None and penalty is None and update_rule is None:
        model = keras.Model(network.inputs, network.logits)
    else:
        if penalty is not None:
            penalty = penalty(layers)
        elif margin_options is not None:
            penalty = marginfit.LargeMargin(layers, **margin_options)
        model = marginfit.MarginModel(
            network.inputs, network.logits, penalty=penalty, on_nonfinite=on_nonfinite,
            update_rule=update_rule,
        )  # fmt: skip
    averaging = {} if ema_momentum is None else {"use_ema": True, "ema_momentum": ema_momentum}
    optimizer = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[optimizer](
        1e-3, **averaging
    )
    model.compile(optimizer, loss=CE, jit_compile=jit_compile)
    return model


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((BATCH, 28, 28, 1), dtype="float32")
    return x, rng.integers(0, 10, BATCH)


def seconds_per_step(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def variant_name(options, jit):
    return (
        f"{'approximate' if options['approximate'] else 'exact'} {options['competitors']} "
        f"top_k={options['top_k']} norm={options['norm']} jit={'on' if jit else 'off'}"
    )


def time_variants(architecture, variants, repeats, steps, min_seconds=0.5):
    """Median seconds per step of each variant, and of CE with each jit
    setting, measured interleaved; each measurement runs at least ``steps``
    steps and about ``min_seconds``."""
    models = {}
    for jit in sorted({jit for _, jit in variants}):
        models[("ce", jit)] = build(architecture, None, jit)
    for options, jit in variants:
        models[(variant_name(options, jit), jit)] = build(architecture, options, jit)
    return time_models(models, repeats, steps, min_seconds)


def time_models(models, repeats, steps, min_seconds=0.5, method="train_on_batch"):
    """Median seconds per ``method`` call (`train_on_batch`, or
    `test_on_batch` for the evaluation step) of each ``{key: model}``,
    measured interleaved (see `time_variants`)."""
    x, y = batch()
    calls = {key: getattr(model, method) for key, model in models.items()}
    counts = {}
    for key, call in calls.items():  # trace, compile and warm up
        call(x, y)
        estimate = seconds_per_step(lambda call=call: call(x, y), 2)
        counts[key] = max(steps, math.ceil(min_seconds / estimate))
    times = {key: [] for key in models}
    for _ in range(repeats):
        for key, call in calls.items():
            times[key].append(seconds_per_step(lambda call=call: call(x, y), counts[key]))
    return {key: statistics.median(values) for key, values in times.items()}


def evaluation_ratio(repeats, steps):
    """The default CNN's evaluation step (`test_on_batch`: the loss and the
    distances to the nearest boundary, `distances.nearest_boundaries`) over the
    CE evaluation step, timed interleaved."""
    models = {
        kind: build("cnn", options) for kind, options in (("margin", DEFAULT_MARGIN), ("ce", None))
    }
    median = time_models(models, repeats, steps, method="test_on_batch")
    ratio = round(median["margin"] / median["ce"], 3)
    print(f"cnn default evaluation step / CE evaluation step: {ratio:.3f}", flush=True)
    return {"evaluation_ratio": ratio}


def composition_ratios(repeats, steps):
    """The default margin, the input-gradient penalty, both
    (`marginfit.Penalties`, one shared forward pass), SAM and the margin
    with SAM on the CNN, each over the plain CE step, timed interleaved.
    ``composed_over_both_alone`` is the composed step over the sum of the
    two steps alone (below 1: cheaper than running them one after the
    other); ``margin+sam_over_margin`` is SAM's factor on the margin's step
    (two gradient passes: about 2)."""
    penalties = {
        "margin": lambda layers: marginfit.LargeMargin(layers, **DEFAULT_MARGIN),
        "input-gradient": lambda layers: marginfit.InputGradientPenalty(),
    }
    penalties["margin+input-gradient"] = lambda layers: [
        penalties["margin"](layers),
        penalties["input-gradient"](layers),
    ]
    models = {"ce": build("cnn")}
    models.update({name: build("cnn", penalty=penalty) for name, penalty in penalties.items()})
    models["sam"] = build("cnn", update_rule=marginfit.SAM())
    models["margin+sam"] = build("cnn", penalty=penalties["margin"], update_rule=marginfit.SAM())
    median = time_models(models, repeats, steps)
    ratios = {name: round(median[name] / median["ce"], 3) for name in models if name != "ce"}
    for name, ratio in ratios.items():
        print(f"cnn {name} step / CE step: {ratio:.3f}", flush=True)
    both = median["margin"] + median["input-gradient"]
    ratios["composed_over_both_alone"] = round(median["margin+input-gradient"] / both, 3)
    ratios["margin+sam_over_margin"] = round(median["margin+sam"] / median["margin"], 3)
    print(
        "cnn margin+input-gradient step / (margin step + input-gradient step): "
        f"{ratios['composed_over_both_alone']:.3f}\n"
        f"cnn margin+sam step / margin step: {ratios['margin+sam_over_margin']:.3f}",
        flush=True,
    )
    return {"composition_ratio": ratios}


# ------------------------------------------------------------ the checks


def check_costs(repeats, steps):
    """Per-step cost of the default CNN step's checks, as ratios of two
    steps timed interleaved: ``input_check_cost_ratio``, the step with its
    in-step label checks (assertions, dropped under XLA) over the same step
    traced without them; ``nonfinite_guard_cost_ratio``, with SGD and with
    Adam, the step with ``on_nonfinite="skip"`` over ``"apply"``."""
    import tensorflow as tf

    x, y = batch()
    unchecked = build("cnn", DEFAULT_MARGIN)
    no_assert = lambda *args, **kwargs: None  # noqa: E731
    with (
        mock.patch.object(tf.debugging, "assert_non_negative", no_assert),
        mock.patch.object(tf.debugging, "assert_less", no_assert),
    ):
        unchecked.train_on_batch(x, y)  # traced here, reused when timed
    models = {"checked": build("cnn", DEFAULT_MARGIN), "unchecked": unchecked}
    for optimizer in ("sgd", "adam"):
        for policy in ("skip", "apply"):
            models[(optimizer, policy)] = build(
                "cnn", DEFAULT_MARGIN, on_nonfinite=policy, optimizer=optimizer
            )
    median = time_models(models, repeats, steps)
    report = {
        "input_check_cost_ratio": round(median["checked"] / median["unchecked"], 4),
        "nonfinite_guard_cost_ratio": {
            optimizer: round(median[(optimizer, "skip")] / median[(optimizer, "apply")], 4)
            for optimizer in ("sgd", "adam")
        },
    }
    print(f"cnn default step, label checks / none: {report['input_check_cost_ratio']:.4f}")
    for optimizer, ratio in report["nonfinite_guard_cost_ratio"].items():
        print(f"cnn default step, {optimizer}, non-finite guard / none: {ratio:.4f}", flush=True)
    return report


def train_command_ratios(repeats, steps):
    """The default CNN step over the CE step, both with Adam as `marginfit
    train` runs them: ``with_weight_average`` (its default, momentum 0.99)
    and ``without``; the four models timed interleaved."""
    settings = {"with_weight_average": 0.99, "without": None}
    models = {
        (setting, kind): build("cnn", options, optimizer="adam", ema_momentum=momentum)
        for setting, momentum in settings.items()
        for kind, options in (("margin", DEFAULT_MARGIN), ("ce", None))
    }
    median = time_models(models, repeats, steps)
    ratios = {
        setting: round(median[(setting, "margin")] / median[(setting, "ce")], 4)
        for setting in settings
    }
    for setting, ratio in ratios.items():
        print(f"cnn default step / CE step, adam {setting}: {ratio:.4f}", flush=True)
    return {"train_command_ratio": ratios}


# ------------------------------------------------------------ naive reference


def naive_step(model, taps, x, y, layers, gamma=10000.0, alpha=4.0):
    """One step of the margin as people hand-write it: Python loops over the
    examples and the competing classes, one tape per example and class."""
    import tensorflow as tf

    with tf.GradientTape() as outer:
        total = CE(y, model(x, training=True))
        for k in range(len(x)):
            example = x[k : k + 1]
            for j in range(10):
                if j == y[k]:
                    continue
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(example)
                    outputs, *hidden = taps(example, training=True)
                    probabilities = tf.nn.softmax(outputs)[0]
                    difference = probabilities[y[k]] - probabilities[j]
                for activation in [example, *hidden]:
                    norm = tf.norm(tape.gradient(difference, activation))
                    distance = difference / (tf.stop_gradient(norm) + 1e-6)
                    clipped = tf.maximum(distance, gamma * (1 - alpha))
                    total += tf.nn.relu(gamma - clipped) / (len(x) * len(layers))
    gradients = outer.gradient(total, model.trainable_weights)
    model.optimizer.apply_gradients(zip(gradients, model.trainable_weights))


def naive_ratio(steps=2):
    """Seconds per naive step / seconds per CE step (batch 64, the CNN)."""
    x, y = batch()
    ce = build("cnn")
    for _ in range(2):
        ce.train_on_batch(x, y)
    ce_seconds = seconds_per_step(lambda: ce.train_on_batch(x, y), 10)
    model = build("cnn")
    names = ["pool1", "pool2"]
    taps = keras.Model(
        model.inputs, [model.outputs[0], *(model.get_layer(n).output for n in names)]
    )
    xt = keras.ops.convert_to_tensor(x)
    naive_seconds = seconds_per_step(
        lambda: naive_step(model, taps, xt, y, ["input", *names]), steps
    )
    return naive_seconds / ce_seconds


# ------------------------------------------------------------------- memory


def peak_memory_child(architecture, options_json):
    """Run in a fresh process: growth of the peak resident memory (MiB) from
    the built model to the end of 5 training steps (tracing, step buffers
    and optimizer state; TensorFlow's CPU allocator keeps no statistics)."""
    options = json.loads(options_json)
    model = build(architecture, options)
    x, y = batch()
    before = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets the peak (VmHWM) to the current size
    for _ in range(5):
        model.train_on_batch(x, y)
    print(json.dumps({"growth_mib": (_resident_kib("VmHWM") - before) / 1024}))


def _resident_kib(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(architecture, options):
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", architecture, json.dumps(options)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["growth_mib"]


# ----------------------------------------------------------------- backends

BACKEND_VARIANTS = {
    "default": DEFAULT_MARGIN,
    "exact": dict(DEFAULT_MARGIN, approximate=False),
    "top_k=9": dict(DEFAULT_MARGIN, competitors="top", top_k=9),
}
"""The steps timed on every backend (the CNN, SGD, batch 64)."""


def backend_child(backend, repeats, steps):
    """Run in a process whose Keras backend is ``backend``: the variants'
    median step times and ratios to CE (jit off and on where the backend
    has both). Prints one JSON line."""
    # JAX always compiles its steps; PyTorch's torch.compile fails on the margin.
    jits = {"tensorflow": [False, True], "jax": [True], "torch": [False]}[backend]
    variants = [(options, jit) for options in BACKEND_VARIANTS.values() for jit in jits]
    median = time_variants("cnn", variants, repeats, steps)
    rows = {}
    for (name, options), jit in itertools.product(BACKEND_VARIANTS.items(), jits):
        key = (variant_name(options, jit), jit)
        rows[f"{name} jit={'on' if jit else 'off'}"] = {
            "ratio": round(median[key] / median[("ce", jit)], 3),
            "margin_ms": round(1e3 * median[key], 2),
            "ce_ms": round(1e3 * median[("ce", jit)], 2),
        }
    print(json.dumps({"backend": backend, "device": _device(backend), "steps": rows}))


def _device(backend):
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    if backend == "torch":
        import torch

        return f"gpu: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"gpu: {gpus[0].name}" if gpus else "cpu"


def backend_ratios(backends, repeats, steps):
    """`backend_child` for each backend in turn; prints the table."""
    report = {}
    for backend in backends:
        result = subprocess.run(
            [sys.executable, __file__, "--backend-child", backend, "--repeats", str(repeats)]
            + ["--steps", str(steps)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            report[backend] = {"error": result.stderr.strip().splitlines()[-1]}
        else:
            report[backend] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{'backend':<11} {'device':<28} {'step':<16} {'ratio to CE':>11} {'ms':>8} {'CE ms':>8}")
    for backend, result in report.items():
        if "error" in result:
            print(f"{backend:<11} {result['error']}")
            continue
        for name, row in result["steps"].items():
            print(
                f"{backend:<11} {result['device']:<28} {name:<16} {row['ratio']:>11.2f} "
                f"{row['margin_ms']:>8.2f} {row['ce_ms']:>8.2f}"
            )
    print(json.dumps({"backends": report}))


# --------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="top_k=1, norm 2, jit off only")
    parser.add_argument("--checks-only", action="store_true", help="only the checks' cost")
    parser.add_argument(
        "--train-command-only",
        action="store_true",
        help="only the default step with Adam, with and without the weight average",
    )
    parser.add_argument(
        "--evaluation-only", action="store_true", help="only the default evaluation step"
    )
    parser.add_argument(
        "--compositions-only",
        action="store_true",
        help="only the margin, the input-gradient penalty, both composed, SAM, margin+SAM",
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=["tensorflow", "jax", "torch"],
        help="only the default, exact and top_k=9 steps on each backend",
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--backend-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return peak_memory_child(*args.memory_child)
    if args.backend_child:
        return backend_child(args.backend_child, max(args.repeats, 15), args.steps)
    if args.backend:
        return backend_ratios(args.backend, args.repeats, args.steps)
    if args.checks_only:
        print(json.dumps(check_costs(max(args.repeats, 15), args.steps)))
        return None
    if args.train_command_only:
        print(json.dumps(train_command_ratios(max(args.repeats, 15), args.steps)))
        return None
    if args.evaluation_only:
        print(json.dumps(evaluation_ratio(max(args.repeats, 15), args.steps)))
        return None
    if args.compositions_only:
        print(json.dumps(composition_ratios(max(args.repeats, 15), args.steps)))
        return None

    # Sampled and top-scoring competitors cost the same for the same top_k.
    competitors = [("sampled", 1), ("top", 1), ("top", 9)]
    grid = itertools.product([True, False], competitors, [2, "inf"], [False, True])
    if args.quick:
        grid = itertools.product([True, False], competitors[:2], [2], [False])
    variants = [
        (dict(approximate=approximate, competitors=kind, top_k=top_k, norm=norm), jit)
        for approximate, (kind, top_k), norm, jit in grid
    ]
    report = {"batch_size": BATCH, "ratios": {}}
    print(f"{'model':<5} {'variant':<46} {'ratio to CE':>11}")
    for architecture in ARCHITECTURES:
        chosen = (
            variants
            if architecture == "cnn"
            else [
                (options, jit)
                for options, jit in variants
                if options["top_k"] == 1
                and options["norm"] == 2
                and not jit
                and options["competitors"] == "sampled"
            ]
        )
        median = time_variants(architecture, chosen, args.repeats, args.steps)
        for options, jit in chosen:
            name = variant_name(options, jit)
            ratio = median[(name, jit)] / median[("ce", jit)]
            report["ratios"][f"{architecture} {name}"] = round(ratio, 3)
            print(f"{architecture:<5} {name:<46} {ratio:>11.2f}", flush=True)

    ce_memory = peak_memory("cnn", None)
    report["peak_memory_ratio"] = {}
    for approximate in (True, False):
        options = dict(approximate=approximate, top_k=1, norm=2, competitors="sampled")
        ratio = peak_memory("cnn", options) / ce_memory
        name = "approximate" if approximate else "exact"
        report["peak_memory_ratio"][f"cnn {name} top_k=1"] = round(ratio, 3)
        print(f"peak memory growth over 5 steps, cnn {name} top_k=1 / CE: {ratio:.2f}", flush=True)

    report.update(check_costs(max(args.repeats, 15), args.steps))
    report.update(train_command_ratios(max(args.repeats, 15), args.steps))
    report.update(evaluation_ratio(max(args.repeats, 15), args.steps))
    report.update(composition_ratios(max(args.repeats, 15), args.steps))

    report["naive_ratio"] = round(naive_ratio(), 1)
    print(f"naive per-example/per-class loop step / CE step: {report['naive_ratio']:.0f}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
