"""The JAX and PyTorch backends against TensorFlow and the naive
reference: the same cases (`backend_worker.CASES`), run by the same code on
every backend; JAX's `keras.distribution`, saving across backends, and the
commands on JAX."""

import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import rounding
from backend_worker import (
    ATTACKS,
    CASES,
    EVALUATE,
    LEARNING_RATE,
    STEP,
    case_data,
    case_penalty,
    run_case,
)
from helpers import (
    DISTRIBUTION_MARGINS,
    assert_logs_match_reference,
    conv_net,
    digits,
    margin_for,
    processes,
    reference_gradients,
    reference_loss,
    skip_without,
    wait_all,
)
from reference import balance_reference

from marginfit.cluster import free_ports

HERE = os.path.dirname(os.path.abspath(__file__))
OTHER_BACKENDS = ("jax", "torch")


@functools.cache
def initial_weights():
    model, _ = conv_net(margin_for(2))
    return model.get_weights()


@functools.cache
def tensorflow_case(name):
    """What case ``name`` gives on TensorFlow (once for both other backends)."""
    (case,) = [case for case in CASES if case[0] == name]
    return run_case(case, initial_weights())


@pytest.fixture(scope="module", params=OTHER_BACKENDS)
def other_results(request, tmp_path_factory):
    """``{case name: {key: array}}`` of every case, run on JAX and on
    PyTorch, each in a fresh process from TensorFlow's initial weights."""
    skip_without(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    weights, out = folder / "weights.npz", folder / "out.npz"
    np.savez(weights, **{f"w{i}": w for i, w in enumerate(initial_weights())})
    env = {**os.environ, "KERAS_BACKEND": request.param, "JAX_PLATFORMS": "cpu"}
    finished = subprocess.run(
        [sys.executable, os.path.join(HERE, "backend_worker.py"), str(weights), str(out)],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = {}
    with np.load(out) as stored:
        for key in stored.files:
            name, field = key.split("|")
            results.setdefault(name, {})[field] = stored[key]
    return results


def _fresh(case):
    """A TensorFlow conv_net (and its taps) with the cases' initial weights."""
    name, margin_options, data_options = case
    model, taps = conv_net(
        penalty=case_penalty(margin_options, initial_weights()),
        output=data_options.get("output", "logits"),
    )
    model.set_weights(initial_weights())
    return model, taps


OWN_REFERENCES = {"defaults", "input_gradient", "trades", "composed", "sam", "vat", "distillation"}
"""Cases that TensorFlow's own tests (`test_margin.py`, `test_input_gradient.py`,
`test_trades.py`, `test_penalties.py`, `test_update_rule.py`, `test_vat.py`,
`test_distillation.py`) check against their references."""


@pytest.mark.parametrize("case", EVALUATE, ids=[case[0] for case in EVALUATE])
def test_evaluation_equals_tensorflow_and_the_reference(other_results, case):
    name, margin_options, data_options = case
    on_other = other_results[name]
    on_tensorflow = tensorflow_case(case[0])
    assert sorted(on_other) == sorted(on_tensorflow)
    for key, value in on_tensorflow.items():
        np.testing.assert_allclose(on_other[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    if data_options.get("output", "logits") != "logits" or set(margin_options) & OWN_REFERENCES:
        # The reference takes logits and the top competitors; TensorFlow's
        # own tests cover the rest.
        return
    margin = margin_for(**margin_options)
    _, taps = _fresh(case)
    x, y, weights = case_data(name, data_options)
    labels = y.argmax(-1) if y.ndim == 2 else y
    hinge, _ = reference_loss(taps, x, labels, margin, sample_weight=weights)
    logs = {key: float(value) for key, value in on_other.items()}
    if margin.balance:
        logits = np.asarray(taps(x)[0], dtype="float64")
        term, _ = balance_reference(logits, weights)
        np.testing.assert_allclose(
            logs["margin_loss"], float(hinge) + margin.balance * term, rtol=1e-5
        )
        return
    assert_logs_match_reference(logs, hinge, margin, taps, x, labels, weights)


@pytest.mark.parametrize("case", STEP, ids=[case[0] for case in STEP])
def test_sgd_steps_equal_tensorflow_and_the_reference(other_results, case):
    """The weights after SGD steps are TensorFlow's to 1e-5 of the steps'
    size and one float32 rounding (`rounding.assert_same_step`; with the
    library's defaults too: the same competitor draws), and, after one step,
    SGD on the reference's gradient."""
    name, margin_options, data_options = case
    model, taps = _fresh(case)
    trainable = [w.numpy() for w in model.trainable_weights]
    on_other = [other_results[name][f"weight{i}"] for i in range(len(trainable))]
    on_tensorflow = list(tensorflow_case(name).values())
    for w0, w_other, w_tf in zip(trainable, on_other, on_tensorflow, strict=True):
        assert rounding.assert_same_step(w_other, w_tf, w0) > 0
    if set(margin_options) & OWN_REFERENCES:
        return  # TensorFlow's own tests check these against their references
    x, y, _ = case_data(name, data_options)
    expected = reference_gradients(model, taps, x, y, margin_for(**margin_options))
    for w0, w_other, g in zip(trainable, on_other, expected):
        np.testing.assert_allclose(w_other - w0, -LEARNING_RATE * g, rtol=2e-4, atol=2e-7)


DISTRIBUTION_FIT = os.path.join(HERE, "jax_distribution_fit.py")


def test_what_pytorch_cannot_do_is_refused_with_the_fix(other_results):
    """``jit_compile=True`` and `marginfit.save_model` on PyTorch raise at
    once, naming the fix; nothing is written."""
    if "refusals" not in other_results:
        pytest.skip("PyTorch only")
    message = str(other_results["refusals"]["jit_compile"])
    assert message.startswith("jit_compile=True (torch.compile) cannot trace the margin")
    assert "jit_compile=False" in message
    message = str(other_results["refusals"]["save_model"])
    assert message.startswith("save_model cannot export a SavedModel on the PyTorch backend")
    assert "KERAS_BACKEND=tensorflow or jax" in message
    assert not other_results["refusals"]["save_model_wrote"]


@pytest.mark.parametrize("case", ATTACKS[:-1], ids=[case[0] for case in ATTACKS[:-1]])
def test_attacks_equal_tensorflow(other_results, case):
    """FGSM, PGD (with and without its random start, drawn the same on every
    backend) and the minimal perturbations perturb the same pixels by the
    same amounts on JAX and PyTorch as on TensorFlow (`test_attacks.py` checks
    TensorFlow's against closed forms)."""
    on_other = other_results[case[0]]
    on_tensorflow = tensorflow_case(case[0])
    assert sorted(on_other) == sorted(on_tensorflow)
    x, _, _ = case_data(case[0], case[2])
    moved = np.abs(on_tensorflow["x_adv"] - x).max()
    assert moved > 1e-2
    np.testing.assert_allclose(on_other["x_adv"], on_tensorflow["x_adv"], rtol=0, atol=1e-5 * moved)
    if "sizes" in on_tensorflow:
        assert np.isfinite(on_tensorflow["sizes"]).all() and (on_tensorflow["sizes"] > 0).all()
        # A size is a logit gap over a gradient norm: the gap's rounding is
        # the logits' (absolute), so small sizes agree to the largest's 1e-5.
        sizes = on_tensorflow["sizes"]
        np.testing.assert_allclose(on_other["sizes"], sizes, rtol=1e-5, atol=1e-5 * sizes.max())


def test_one_step_of_adversarial_training_equals_tensorflow(other_results):
    """`adversary=PGD(...)` with the margin: one SGD step on JAX or PyTorch
    trains TensorFlow's weights (as above), which are SGD on the
    perturbed batch (`test_attacks.py`)."""
    case = ATTACKS[-1]
    before = [w.numpy() for w in _fresh(case)[0].trainable_weights]
    on_tensorflow = list(tensorflow_case(case[0]).values())
    for i, (w0, w_tf) in enumerate(zip(before, on_tensorflow, strict=True)):
        assert rounding.assert_same_step(other_results[case[0]][f"weight{i}"], w_tf, w0) > 1e-4


@pytest.fixture(scope="module")
def distribution_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("distribution")


@pytest.fixture(scope="module")
def data_parallel_report(distribution_folder):
    """Two CPU devices need a fresh process: JAX fixes them at start-up."""
    finished = subprocess.run(
        [sys.executable, DISTRIBUTION_FIT, str(distribution_folder)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("margin", [*DISTRIBUTION_MARGINS, "defaults+sam"])
def test_data_parallel_on_two_devices_matches_one_device(data_parallel_report, margin):
    """`keras.distribution.DataParallel` trains the weights and logs of one
    device, up to the order of their sums (float64 runs, bounds in
    `rounding`), with the library's defaults (sampled competitors and the
    balance term: functions of the global batch), and with `marginfit.SAM`
    (which perturbs with the global batch's gradient)."""
    assert data_parallel_report["devices"] == 2
    report = data_parallel_report["margins"][margin]
    assert report["max_weight_change"] > 1e-2
    rounding.assert_same_weights(report["weights"], report["single_weights"])
    rounding.assert_same_logs(report["parallel"], report["single"], batch=16)


def test_a_nonfinite_batch_skips_the_update_under_data_parallel(data_parallel_report):
    """A NaN in one example skips that step's update on both devices: the
    weights are those of the epoch without the batch, exactly."""
    assert data_parallel_report["poisoned_nonfinite_steps"] == 1
    assert data_parallel_report["poisoned_max_difference"] == 0.0


@pytest.fixture(scope="module")
def two_processes(distribution_folder, data_parallel_report):
    """The one-device runs and those of the two processes, each
    ``{run: [weights, logs]}``."""
    (port,) = free_ports(1)
    commands = [[DISTRIBUTION_FIT, str(distribution_folder), str(port), str(i)] for i in (0, 1)]
    with processes(commands, cwd=HERE, stderr=subprocess.PIPE, text=True) as started:
        for code, _, stderr in wait_all(started, 600):
            assert code == 0, stderr[-3000:]
    loaded = []
    for name in ("single", "process0", "process1"):
        with open(distribution_folder / f"{name}.json") as file:
            loaded.append(json.load(file))
    return loaded


@pytest.mark.parametrize("margin", list(DISTRIBUTION_MARGINS))
def test_two_processes_end_where_one_process_does(two_processes, margin):
    """Two processes joined by `keras.distribution.initialize`, each feeding
    its half of every global batch, train the weights and logs of one
    process up to the order of their sums (as above), with the library's
    defaults; both hold the same weights."""
    (single, single_logs), *joined = (runs[margin] for runs in two_processes)
    for weights, logs in joined:
        rounding.assert_same_weights(weights, single)
        rounding.assert_same_logs(logs, single_logs, batch=16)
    assert joined[0][0] == joined[1][0]


def test_a_nonfinite_batch_in_one_process_skips_the_update_in_both(two_processes):
    """A NaN in process 0's half of a batch skips that step in both
    processes: their weights are those of the epoch without the batch."""
    for runs in two_processes[1:]:
        assert runs["poisoned"][1]["nonfinite_steps"] == 1
        assert runs["poisoned"][0] == runs["clean"][0]


def test_a_model_saved_on_tensorflow_trains_on_jax_and_comes_back(tmp_path):
    """`.keras` from TensorFlow loads on JAX (weights, optimizer state) and
    predicts the same; an epoch on JAX trains the weights an epoch on
    TensorFlow does from the same file; JAX's `.keras` and its exported
    SavedModel (`marginfit.save_model`) give JAX's predictions back on
    TensorFlow."""
    import tensorflow as tf

    import marginfit

    model, _ = conv_net(DISTRIBUTION_MARGINS["authors"])
    model.compile(
        keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = digits(48)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "tensorflow.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    before = model.predict(x, verbose=0)
    finished = subprocess.run(
        [sys.executable, os.path.join(HERE, "jax_saving_worker.py"), str(tmp_path)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    on_jax = dict(np.load(tmp_path / "jax.npz"))
    np.testing.assert_allclose(on_jax["loaded"], before, rtol=1e-5, atol=1e-6)
    # The same epoch on TensorFlow, from the same file.
    again = marginfit.load_model(tmp_path / "tensorflow.keras")
    again.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    moved = max(np.abs(a - b).max() for a, b in zip(again.get_weights(), model.get_weights()))
    assert moved > 1e-3
    for i, weight in enumerate(again.get_weights()):
        np.testing.assert_allclose(on_jax[f"w{i}"], weight, rtol=1e-4, atol=1e-5 * moved)
    back = marginfit.load_model(tmp_path / "jax.keras")
    assert isinstance(back, marginfit.MarginModel) and back.margin == model.margin
    np.testing.assert_allclose(back.predict(x, verbose=0), on_jax["trained"], rtol=1e-5, atol=1e-6)
    exported = tf.saved_model.load(str(tmp_path / "saved"))  # held: it owns the variables
    served = exported.serve(tf.constant(x))
    np.testing.assert_allclose(served.numpy(), on_jax["trained"], rtol=1e-5, atol=1e-6)
    restored = marginfit.load_model(tmp_path / "saved")
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), on_jax["trained"], rtol=1e-5, atol=1e-6
    )


WITHOUT_TENSORFLOW = """
import sys

class NoTensorFlow:  # a host with JAX alone
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTensorFlow())
"""
"""Python that makes ``import tensorflow`` fail, as where it is not installed."""


def test_the_commands_run_on_jax_without_tensorflow(tmp_path):
    """`marginfit train` and `marginfit compare` (attacks, PGD adversarial
    training, measured distances) under ``KERAS_BACKEND=jax`` on a host
    without TensorFlow: the model
    that train saves predicts on TensorFlow the test accuracy it reported;
    compare's attacked accuracies stay below the clean one."""
    import marginfit

    x, y = digits(250)
    data = str(tmp_path / "digits.npz")
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    train = ["train", "--data", data, "--epochs", "1", "--output", str(tmp_path / "train")]
    compare = ["compare", "--data", data, "--epochs", "1", "--methods", "pgd-at"]
    compare += ["--noise-levels", "", "--eps", "0.1", "--pgd-steps", "2"]
    compare += ["--output", str(tmp_path / "compare")]
    code = f"{WITHOUT_TENSORFLOW}\nfrom marginfit import cli, tuning\n"
    code += f"cli.run({train!r})\ncli.run({compare!r})"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    finished = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    model = marginfit.load_model(tmp_path / "train" / "model.keras")
    predicted = model.predict(x[200:], verbose=0).argmax(-1)
    assert summary["test"]["accuracy"] == pytest.approx(np.mean(predicted == y[200:]))
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    clean = results["noise"]["0"]["pgd-at"]
    for attack in ("fgsm", "pgd"):
        (attacked,) = results["attacks"]["pgd-at"][attack]
        assert 0 <= attacked <= clean
    assert 0 < results["median_distances"]["pgd-at"]["measured"] < np.inf
