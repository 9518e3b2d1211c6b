"""The `marginfit` command: `marginfit train` and `marginfit compare`.

    marginfit train                 # a small CNN with the margin on the bundled digits
    marginfit train --data mnist --label-noise 0.4 --epochs 60
    marginfit compare --noise-levels 0.2,0.4 --eps 0.05,0.1,0.2

`train` fits one model and writes model.keras, history.csv and summary.json
into --output; `compare` fits the same network with plain cross-entropy and
with the margin and writes report.md with its table and PNG figures.
"""

import argparse
import json
import math
import os
import shlex
import sys
import time

import keras
import numpy as np

from marginfit import cluster, files, methods, networks
from marginfit import data as data_lib
from marginfit.margin import LargeMargin
from marginfit.model import MarginModel

# ------------------------------------------------------------------ options


def _floats(text):
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, received {text!r}"
        ) from None


def _rate(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), received {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), received {text}")
    return value


def _choice(*choices):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(choices)}, received {text}"
            )
        return text

    return parse


_norm = _choice("1", "2", "inf")


def _methods(text):
    try:
        return methods.check([name for name in text.split(",") if name])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _non_negative(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, received {text}")
    return value


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, received {text}")
        return value

    return parse


# {group: [(flag, type, default, help)]}: the options of both commands.
_OPTIONS = {
    "data": [
        (
            "--data",
            str,
            "digits",
            "'digits' (bundled with scikit-learn, the default), 'digits28' (the same digits "
            "resized to 20x20 and placed at random in 28x28), a .npz file with "
            "x_train/y_train/x_test/y_test (or x/y, split 75/25), or "
            f"{'/'.join(data_lib.KERAS_DATASETS)} (downloaded by keras.datasets; needs network)",
        ),
        (
            "--label-noise",
            _rate,
            0.0,
            "share of training labels replaced by a random other class (default 0)",
        ),
    ],
    "training": [
        ("--epochs", _positive(int), 60, "epochs (default 60, the authors' setting)"),
        ("--batch-size", _positive(int), 64, "batch size (default 64)"),
        (
            "--lr-features",
            _positive(float),
            1e-3,
            "learning rate of the conv (or first dense) layers (default 1e-3)",
        ),
        (
            "--lr-head",
            _positive(float),
            1e-3,
            "learning rate of the other layers (default 1e-3)",
        ),
        (
            "--optimizer",
            _choice(*networks.OPTIMIZERS),
            "adam",
            "'adam' (default) or 'rmsprop': the authors' RMSProp (epsilon 1e-2, rate x0.96 "
            "every 2000 steps, gradients clipped to norm 5 per layer group)",
        ),
        (
            "--ema",
            _rate,
            0.99,
            "momentum of the moving average of the weights (Keras' use_ema) that the val_ "
            "logs, the test set and the saved model use (default 0.99; 0: the last weights)",
        ),
        ("--batchnorm", bool, False, "batch normalization before each ReLU (default off)"),
        ("--l2", _non_negative, 0.0, "L2 weight on every kernel and bias (default 0)"),
        (
            "--validation-split",
            _fraction,
            0.1,
            "share of the (noisy) training data held out for the val_ logs (default 0.1); "
            "the test set is evaluated once, after training",
        ),
        ("--seed", int, 0, "seed of weights, split and noise (default 0)"),
    ],
    "adversarial training (method pgd-at)": [
        (
            "--pgd-eps",
            _positive(float),
            0.1,
            "L-inf radius of the training attack, input units (default 0.1)",
        ),
        (
            "--pgd-steps",
            _positive(int),
            methods.PGD_STEPS,
            f"steps of the training attack (default {methods.PGD_STEPS}, the authors' MNIST "
            "setting; step size 2.5 eps / steps)",
        ),
    ],
    "margin": [
        (
            "--gamma",
            _positive(float),
            10000.0,
            "desired margin (default 10000, the authors' setting)",
        ),
        (
            "--alpha",
            _positive(float),
            4.0,
            "distances below gamma*(1-alpha) are clipped (default 4)",
        ),
        ("--norm", _norm, "2", "distance norm: 1, 2 or inf (default 2)"),
        (
            "--competitors",
            _choice("top", "sampled"),
            None,
            "competing classes: 'sampled' (drawn at random per example and step, the "
            "default) or 'top' (the highest-scoring, the authors' choice)",
        ),
        ("--top-k", _positive(int), None, "competitors per example (default 1)"),
        (
            "--aggregation",
            _choice("max", "sum"),
            None,
            "'max' (the nearest competitor, default) or 'sum' (every one)",
        ),
        (
            "--exact",
            bool,
            False,
            "differentiate through the gradient norm too (second-order backprop), so that "
            "the margin also shrinks the gradients, as robustness to perturbations needs "
            "(default off: the norm is a constant, the first-order approximation)",
        ),
        (
            "--space",
            _choice("probabilities", "logits"),
            None,
            "scores the margin compares: 'probabilities' (the softmax, the authors' "
            "choice and the default; gamma is then a switch, not a distance) or "
            "'logits' (gamma is a distance in the layer's units: pixels at the input)",
        ),
        (
            "--balance",
            _non_negative,
            1.0,
            "weight of the class-balance term, KL(uniform || batch-mean prediction), "
            "that keeps the network from predicting one class for everything "
            "(default 1; 0: the authors' loss)",
        ),
        (
            "--ce-weight",
            _non_negative,
            0.0,
            "weight of the cross-entropy next to the margin loss (default 0: the margin "
            "alone, the authors' setting, which resists label noise best)",
        ),
        (
            "--layer-weights",
            _choice("none", "sizes"),
            "none",
            "scale of each layer's gradient norm: 'none' (1, default) or 'sizes' (the "
            "layer's activation count, the authors' choice with the inf norm)",
        ),
        (
            "--layers",
            str,
            "all",
            "comma-separated margin layers: input, conv1, conv2, dense1 (flat inputs: "
            "dense1), or 'all' = input and every hidden layer (default)",
        ),
    ],
}


# Named settings: defaults for the flags (which still override them) and
# the network's shape.
PRESETS = {
    # The authors' MNIST configuration (their mnist_config.py and train.py):
    # the margin alone on the input and both conv layers, inf norm with the
    # layer sizes as weights, top-scoring competitor, RMSProp 0.1 with decay
    # and clipping, batch norm, L2 5e-4 * sum(w^2) / 2, batch 256, 200 epochs.
    "authors": {
        "flags": {
            "epochs": 200,
            "batch_size": 256,
            "gamma": 10000.0,
            "alpha": 4.0,
            "norm": "inf",
            "competitors": "top",
            "top_k": 1,
            "aggregation": "max",
            "layers": "input,conv1,conv2",
            "layer_weights": "sizes",
            "optimizer": "rmsprop",
            "lr_features": 0.1,
            "lr_head": 0.1,
            "batchnorm": True,
            "l2": 2.5e-4,
            "balance": 0.0,
            "ema": 0.0,
        },
        "network": {"conv_filters": (32, 64), "kernel_size": 5, "dense_units": (512,)},
    },
    # The margin for L-inf robustness (the README's `LargeMargin` call): on the input, in
    # logit space (gamma is a distance in pixels), the nearest boundary of
    # the top-scoring competitor, differentiated through the gradient norm
    # (which the margin must shrink), beside the cross-entropy at a tenth of
    # the margin's weight (chosen on validation PGD accuracy; see the README).
    "robust": {
        "flags": {
            "layers": "input",
            "norm": "inf",
            "space": "logits",
            "competitors": "top",
            "top_k": 1,
            "gamma": 0.3,
            "balance": 0.0,
            "exact": True,
            "ce_weight": 0.1,
        },
        "network": {},
    },
}


def parser(preset=None):
    """The argument parser of the `marginfit` command, with the defaults of
    ``preset`` (a key of `PRESETS`) if given."""
    defaults = PRESETS[preset]["flags"] if preset else {}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named settings: 'authors' = the authors' MNIST configuration (RMSProp 0.1, "
        "batch norm, L2, inf norm with layer sizes as weights, top-scoring competitor, "
        "5x5 convs, dense 512, batch 256, 200 epochs); 'robust' = the margin for L-inf "
        "robustness (on the input, logit space, gamma 0.3 pixels, exact gradients, beside "
        "the cross-entropy at weight 0.1); flags given as well override it",
    )
    for group, options in _OPTIONS.items():
        arguments = common.add_argument_group(group)
        for flag, kind, default, help_text in options:
            default = defaults.get(flag[2:].replace("-", "_"), default)
            if kind is bool:
                arguments.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
                )
            else:
                arguments.add_argument(flag, type=kind, default=default, help=help_text)
    common.add_argument("--output", help="output directory (default runs/<command>)")

    top = argparse.ArgumentParser(
        prog="marginfit",
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train",
        parents=[common],
        help="train one model with the margin",
        description="Train a small network with the large-margin loss.",
    )
    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="cross-entropy vs margin: report with table and plots",
        description="Train the same network with cross-entropy and with the margin, then write "
        "report.md with accuracy under label noise and FGSM/PGD, and PNG figures.",
    )
    compare.add_argument(
        "--methods",
        type=_methods,
        default=[methods.CROSS_ENTROPY, methods.MARGIN],
        help=f"comma-separated methods: {', '.join(methods.NAMES)} (default "
        "cross-entropy,margin); each peer at its authors' published settings "
        "(marginfit.methods)",
    )
    compare.add_argument(
        "--noise-levels",
        type=_floats,
        default=[0.4],
        help="label-noise rates to compare at (default 0.4)",
    )
    compare.add_argument(
        "--eps",
        type=_floats,
        default=[0.05, 0.1, 0.2],
        help="L-inf radii of the FGSM/PGD evaluation, input units (default 0.05,0.1,0.2)",
    )
    return top


# --------------------------------------------------------------- the model


def load(source, label_noise=0.0, seed=0):
    """``((x_train, y_train), (x_test, y_test))`` with ``label_noise`` of the
    training labels flipped."""
    (x_train, y_train), test = data_lib.load(source, seed)
    if label_noise:
        classes = data_lib.num_classes(y_train, test[1])
        y_train = data_lib.add_label_noise(y_train, label_noise, classes, seed)
    return (x_train, y_train), test


def margin_from(args, network):
    """The `LargeMargin` the options ask for, on ``network``'s layers."""
    layers = networks.margin_layers(network) if args.layers == "all" else args.layers.split(",")
    norm = np.inf if args.norm == "inf" else int(args.norm)
    chosen = {
        "competitors": args.competitors,
        "top_k": args.top_k,
        "aggregation": args.aggregation,
        "space": args.space,
    }
    defaults = {name: value for name, value in chosen.items() if value is not None}
    if args.layer_weights == "sizes":
        defaults["layer_weights"] = networks.layer_sizes(network, layers)
    return LargeMargin(
        layers,
        gamma=args.gamma,
        alpha=args.alpha,
        norm=norm,
        balance=args.balance,
        approximate=not args.exact,
        **defaults,
    )


def build(args, input_shape, num_classes, method=methods.MARGIN, num_examples=None):
    """The `networks.classifier`, compiled with one optimizer per layer group
    for ``method`` (a name of `methods.NAMES`; the margin only for
    ``"margin"``). Returns ``(model, margin)``, the margin the options ask
    for either way.

    ``num_examples``, the training set's size, caps the weight average's
    span (`ema_momentum`) for short runs."""
    keras.utils.set_random_seed(args.seed)
    shape = PRESETS[args.preset]["network"] if args.preset else {}
    network = networks.classifier(
        input_shape, num_classes, batchnorm=args.batchnorm, l2=args.l2, **shape
    )
    margin = margin_from(args, network)
    model = networks.margin_classifier(
        network,
        margin if method == methods.MARGIN else None,
        args.lr_features,
        args.lr_head,
        args.ce_weight,
        args.optimizer,
        ema_momentum(args, num_examples),
        loss=methods.loss(method),
        adversary=methods.adversary(method, args.pgd_eps, args.pgd_steps),
    )
    return model, margin


EMA_SHARE = 0.1
"""Largest share of a run's steps that the weight average spans."""


def ema_momentum(args, num_examples=None):
    """The optimizers' ``ema_momentum``: None where ``--ema`` is 0, else
    ``--ema``, lowered where needed so that the average's span,
    ``1 / (1 - momentum)`` steps, is at most `EMA_SHARE` of the run's steps
    on ``num_examples`` training examples (before the validation split)."""
    if not args.ema:
        return None
    if num_examples is None:
        return args.ema
    batches = math.ceil(num_examples * (1 - args.validation_split) / args.batch_size)
    return min(args.ema, max(0.0, 1 - 1 / (EMA_SHARE * args.epochs * batches)))


def weight_average_callbacks(args, on_epoch_end=False):
    """``[keras.callbacks.SwapEMAWeights]`` where ``--ema`` is on, so that
    validation (and, if ``on_epoch_end``, the callbacks after it at epoch
    end) sees the averaged weights; else ``[]``."""
    return [keras.callbacks.SwapEMAWeights(on_epoch_end)] if args.ema else []


def fit(args, model, data, output, verbose=1):
    """Fits on the training data less a validation split (the logs' ``val_``
    metrics, for callbacks); the test set is evaluated once, at the end."""
    (x_train, y_train), (x_test, y_test) = data
    (x_fit, y_fit), validation = data_lib.split(x_train, y_train, args.validation_split, args.seed)
    started = time.perf_counter()
    # The log grows per epoch under a temporary name; it replaces
    # history.csv once training has finished.
    with files.atomic_path(os.path.join(output, "history.csv")) as log:
        history = model.fit(
            x_fit,
            y_fit,
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_data=validation,
            verbose=verbose,
            callbacks=[*weight_average_callbacks(args), keras.callbacks.CSVLogger(log)],
        )
    logs = model.evaluate(x_test, y_test, batch_size=256, return_dict=True, verbose=0)
    logs["seconds"] = time.perf_counter() - started
    return history.history, logs


def _command_line(argv):
    return "marginfit " + " ".join(shlex.quote(a) for a in argv)


# ----------------------------------------------------------------- commands


def train(args, argv):
    """Writes model.keras, history.csv and summary.json into the output
    directory, each atomically (`marginfit.files`), while holding the
    directory against other writers.

    Where ``TF_CONFIG`` names a cluster, every worker runs this: the model
    trains under `tf.distribute.MultiWorkerMirroredStrategy` (``--batch-size``
    is the global batch, split over the workers), and only the chief writes
    the outputs (`marginfit.cluster`).
    """
    strategy = cluster.strategy()
    output = args.output or os.path.join("runs", "train")
    with cluster.output_directory(output, "marginfit train") as directory:
        return _train(args, argv, directory, strategy)


def _train(args, argv, output, strategy):
    data = load(args.data, args.label_noise, args.seed)
    with strategy.scope():
        (x_train, y_train), (_, y_test) = data
        classes = data_lib.num_classes(y_train, y_test)
        model, _ = build(args, x_train.shape[1:], classes, num_examples=len(x_train))
    _, logs = fit(args, model, data, output)
    with files.atomic_path(os.path.join(output, "model.keras")) as temporary:
        model.save(temporary)
    summary = {"command": _command_line(argv), "test": {k: float(v) for k, v in logs.items()}}
    files.write_text(os.path.join(output, "summary.json"), json.dumps(summary, indent=2))
    print("\n  test metric            value")
    for name, value in sorted(logs.items()):
        print(f"  {name:<20} {value:>8.4f}")
    where = output if cluster.is_chief() else "the chief's output directory"
    print(f"\ntest accuracy {logs['accuracy']:.4f}; model, history and summary in {where}")
    return summary


def compare(args, argv):
    """Writes report.md, results.json, the figures and history.csv into the
    output directory, each atomically, holding it against other writers."""
    output = args.output or os.path.join("runs", "compare")
    with files.exclusive(output, "marginfit compare"):
        return _compare(args, argv, output)


def _compare(args, argv, output):
    from marginfit import report  # matplotlib only here

    results = {
        "command": _command_line(argv),
        "methods": args.methods,
        "noise": {},
        "attacks": {},
        "seconds": {},
        "curves": {},
        "distances": {},
        "measured": {},
    }
    for noise in [0.0, *args.noise_levels]:
        data = load(args.data, noise, args.seed)
        shape, classes = data[0][0].shape[1:], data_lib.num_classes(data[0][1], data[1][1])
        row = {}
        for name in args.methods:
            print(f"\n== {name}, label noise {noise:.0%} ==")
            model, margin = build(args, shape, classes, name, len(data[0][0]))
            history, logs = fit(args, model, data, output, verbose=2)
            row[name] = logs["accuracy"]
            if noise == 0.0:
                x_test, y_test = data[1]
                results["attacks"][name] = report.robustness(model, x_test, y_test, args.eps)
                results["seconds"][name] = logs["seconds"]
                results["curves"][name] = history
                results["distances"][name] = MarginModel.wrap(model, margin).margin_distances(
                    x_test, y_test
                )
                results["measured"][name] = report.measured_distances(
                    model, x_test, y_test, margin.norm
                )
        results["noise"][f"{noise:g}"] = row
    path = report.write(results, output, args.eps)
    print(f"\nreport in {path}")
    return results


def parse_args(argv):
    """``argv`` parsed with the defaults of its ``--preset``, if any."""
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=sorted(PRESETS))
    known, _ = preset.parse_known_args(argv)
    return parser(known.preset).parse_args(argv)


def run(argv):
    """Runs the command line ``argv``; returns its results."""
    args = parse_args(argv)
    return {"train": train, "compare": compare}[args.command](args, argv)


def main(argv=None):
    """Entry point of the console script; returns the exit status. Bad
    settings (an unknown layer, unreadable data, no network) end with one
    line naming the problem instead of a traceback."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"marginfit: {error}") from error
    return 0


if __name__ == "__main__":
    sys.exit(main())
