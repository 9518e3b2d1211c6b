"""The `marginfit` command: options, errors, data, and both subcommands."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import digits

import marginfit
from marginfit import cli, data, methods
from marginfit.experiments import Experiment


def parse(*argv):
    """The `Experiment` that a command line describes."""
    return cli.parse_args(list(argv)).experiment


def test_defaults_and_options():
    args = parse("train")
    assert args == Experiment()
    assert (args.data, args.epochs, args.batch_size, args.gamma, args.alpha, args.norm) == (
        "digits",
        60,
        64,
        10000.0,
        4.0,
        "2",
    )
    assert (args.layers, args.label_noise, args.lr_features, args.lr_head, args.seed) == (
        "all",
        0.0,
        1e-3,
        1e-3,
        0,
    )
    assert args.ce_weight == 0.0
    assert args.ema == 0.99
    argv = ["compare", "--noise-levels", "0.2,0.4,0.6", "--eps", "0.1", "--norm", "inf"]
    args = cli.parse_args([*argv, "--layers", "input,dense", "--lr-head", "3e-4"])
    assert args.noise_levels == [0.2, 0.4, 0.6] and args.eps == [0.1]
    assert args.experiment == Experiment(norm="inf", layers="input,dense", lr_head=3e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--label-noise", "1.5"], "must be in [0, 1)"),
        (["train", "--norm", "3"], "must be one of 1, 2, inf"),
        (["train", "--competitors", "best"], "must be one of top, sampled"),
        (["train", "--epochs", "0"], "must be > 0"),
        (["train", "--gamma", "-1"], "must be > 0"),
        (["compare", "--eps", "a,b"], "comma-separated numbers"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_options_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_data_and_missing_network_are_named(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="neither 'digits', 'digits28'"):
        cli.main(["train", "--data", "images/", "--output", str(tmp_path)])

    def offline():
        raise OSError("no route to host")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(RuntimeError, match="needs network access"):
        Experiment(data="mnist").load()


def test_bad_layer_name_ends_with_one_line_naming_the_valid_ones(tmp_path):
    with pytest.raises(SystemExit, match=r"marginfit: .*'conv9'.*conv1"):
        cli.main(["train", "--layers", "input,conv9", "--epochs", "1", "--output", str(tmp_path)])


def test_label_noise_flips_exactly_that_share_to_other_classes():
    labels = np.arange(1000) % 10
    noisy = data.add_label_noise(labels, 0.4, 10, seed=3)
    changed = noisy != labels
    assert changed.sum() == 400
    assert noisy.min() >= 0 and noisy.max() < 10
    # Every class is a target of the noise, none favoured heavily.
    counts = np.bincount(noisy[changed], minlength=10)
    assert counts.min() > 20
    np.testing.assert_array_equal(noisy, data.add_label_noise(labels, 0.4, 10, seed=3))
    np.testing.assert_array_equal(labels, np.arange(1000) % 10)  # input untouched
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        data.add_label_noise(labels, 1.0, 10)


def test_train_writes_model_history_and_summary(tmp_path, capsys):
    summary = cli.run(["train", "--epochs", "2", "--output", str(tmp_path)])
    assert summary["test"]["accuracy"] > 0.3
    # The table shows what is informative: the margin alone is the whole
    # loss, and the defaults count nothing; the summary keeps every log.
    table = capsys.readouterr().out.split("test metric")[-1]
    rows = {line.split()[0] for line in table.splitlines()[1:] if line.startswith("  ")}
    assert {"accuracy", "loss", "distance_input"} <= rows
    assert not {"ce_loss", "margin_loss", "dead_rate", "nonfinite_steps"} & rows
    assert {"margin_loss", "dead_rate"} <= set(summary["test"])
    assert "distance_input" in summary["test"]
    model = keras.models.load_model(tmp_path / "model.keras")
    assert model.margin.layers == ("input", "conv1", "conv2", "dense1")
    assert json.loads((tmp_path / "summary.json").read_text())["command"].startswith(
        "marginfit train"
    )
    assert (tmp_path / "history.csv").read_text().count("\n") == 3


def test_train_on_a_flat_npz_with_its_own_split(tmp_path):
    x, y = digits(300)
    flat = x.reshape(300, -1)
    np.savez(
        tmp_path / "d.npz", x_train=flat[:200], y_train=y[:200], x_test=flat[200:], y_test=y[200:]
    )
    summary = cli.run(
        [
            "train",
            "--data",
            str(tmp_path / "d.npz"),
            "--epochs",
            "1",
            "--layers",
            "input,dense1",
            "--label-noise",
            "0.2",
            "--ce-weight",
            "0",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    model = keras.models.load_model(tmp_path / "out" / "model.keras")
    assert [layer.name for layer in model.layers if layer.weights] == ["dense1", "logits"]
    assert model.margin.layers == ("input", "dense1")
    assert "ce_loss" not in summary["test"]  # the margin alone: nothing else to log


def small_digits(path):
    """200 training and 50 test digits as an .npz file for the commands."""
    x, y = digits(250)
    np.savez(path, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    return str(path)


def compare(tmp_path, names, noise_levels):
    """Runs `marginfit compare` of ``names`` on small digits, 1 epoch;
    returns its results and output directory."""
    argv = ["compare", "--data", small_digits(tmp_path / "digits.npz"), "--epochs", "1"]
    argv += ["--methods", ",".join(names), "--noise-levels", noise_levels, "--eps", "0.05,0.1"]
    argv += ["--pgd-steps", "2", "--output", str(tmp_path / "out")]
    return cli.run(argv), tmp_path / "out"


def test_compare_trains_each_method_at_each_noise_level(tmp_path):
    """Every noise level trains every method afresh on its own labels (two
    methods: the loop is the same for all; the next test runs all)."""
    names = ["cross-entropy", "margin"]
    results, output = compare(tmp_path, names, "0.4")
    saved = json.loads((output / "results.json").read_text())
    assert saved["noise"].keys() == {"0", "0.4"}
    for level in ("0", "0.4"):
        assert list(saved["noise"][level]) == names
        assert saved["noise"][level] == results["noise"][level]
    report = (output / "report.md").read_text()
    assert "0% label noise" in report and "40% label noise" in report


def test_compare_runs_every_method_side_by_side(tmp_path):
    names = list(methods.NAMES)
    results, output = compare(tmp_path, names, "")
    saved = json.loads((output / "results.json").read_text())
    assert saved["methods"] == names
    assert list(saved["noise"]) == ["0"] and list(saved["noise"]["0"]) == names
    for name in names:
        assert len(saved["attacks"][name]["pgd"]) == len(saved["attacks"][name]["fgsm"]) == 2
        assert saved["seconds"][name] > 0
        # Attacked accuracy never beats clean accuracy (a float32 log).
        clean = np.float32(results["noise"]["0"][name])
        assert all(np.float32(a) <= clean for a in results["attacks"][name]["pgd"])
    report = (output / "report.md").read_text()
    assert "| | " + " | ".join(names) + " |" in report
    for row in (
        "0% label noise",
        "FGSM accuracy, eps 0.1",
        "PGD accuracy, eps 0.05",
        "training seconds, clean labels",
        "median distance at the input, estimated",
        "median distance at 'dense1', estimated",
        "median distance at the input, measured (DeepFool)",
    ):
        assert row in report
    for name in names:
        # The measured distances are the minimal perturbations' sizes, in pixels.
        measured = results["measured"][name]
        correct = measured[(measured > 0) & np.isfinite(measured)]
        assert saved["median_distances"][name]["measured"] == pytest.approx(np.median(correct))
        estimated = results["distances"][name]["input"]
        assert saved["median_distances"][name]["input"] == pytest.approx(
            np.median(estimated[estimated > 0])
        )
    assert report.count("Produced by: `marginfit compare") >= 1 + 7
    for name in (
        "curves",
        "robustness",
        "distances_input",
        "distances_dense1",
        "measured_distances",
    ):
        png = output / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name}.png)" in report
    assert cli.parse_args(["compare", "--noise-levels", ""]).noise_levels == []


def test_each_method_builds_its_loss_and_adversary():
    """The peers at their authors' settings (`marginfit.methods`), the margin
    alone, and PGD adversarial training at --pgd-eps."""
    args = parse("compare", "--pgd-eps", "0.2", "--pgd-steps", "7")
    x, _ = digits(4)
    expected = {
        "cross-entropy": keras.losses.SparseCategoricalCrossentropy,
        "gce": marginfit.losses.GeneralizedCrossEntropy,
        "sce": marginfit.losses.SymmetricCrossEntropy,
        "nce-rce": marginfit.losses.NCEAndRCE,
        "ce-eps-mae": marginfit.losses.EpsilonSoftmaxCEAndMAE,
        "anl-ce": marginfit.losses.ActiveNegativeLoss,
        "ldr-kl": marginfit.losses.LDRKL,
        "pgd-at": keras.losses.SparseCategoricalCrossentropy,
        "fgsm-at": keras.losses.SparseCategoricalCrossentropy,
        "trades": keras.losses.SparseCategoricalCrossentropy,
    }
    adversaries = {
        "pgd-at": marginfit.attacks.PGD(0.2, steps=7),
        "fgsm-at": marginfit.attacks.PGD(0.2, steps=1, step_size=0.25),
    }
    for name in methods.NAMES:
        model, _ = args.build(x.shape[1:], 10, name)
        assert (model.margin is not None) == (name == "margin")
        if name == "margin":
            assert model.loss is None
        else:
            assert type(model.loss) is expected[name]
            assert model.loss.get_config()["from_logits"] is True
        assert model.adversary == adversaries.get(name)
        if name == "trades":
            assert model.penalty == marginfit.TRADES(0.2, weight=1.0, steps=7)
        # ANL-CE's L1 term on every kernel and bias: 1e-6 * sum |w|.
        l1 = sum(np.abs(w).sum() for w in model.get_weights())
        regularization = float(keras.ops.sum(model.losses)) if model.losses else 0.0
        assert regularization == pytest.approx(1e-6 * l1 if name == "anl-ce" else 0.0, rel=1e-5)
    assert methods.loss("nce-rce").get_config()["beta"] == 10.0  # the MNIST setting
    # Any method trains on fgsm-at's examples with --adversary fgsm.
    combined, _ = parse("compare", "--adversary", "fgsm").build(x.shape[1:], 10, "margin")
    assert combined.adversary == marginfit.attacks.fgsm_random_start(0.1)
    assert combined.margin is not None
    with pytest.raises(SystemExit):
        cli.parse_args(["compare", "--methods", "cross-entropy,focal"])


def test_importing_the_commands_leaves_the_environment_alone():
    # They used to set TF_CPP_MIN_LOG_LEVEL after TensorFlow was imported,
    # where it has no effect; a library does not change its users' environment.
    # (TensorFlow 2.21 sets variables of its own when imported: the baseline
    # is taken after Keras, and so TensorFlow, are imported.)
    code = (
        "import os, sys, keras; before = dict(os.environ)\n"
        "import marginfit.cli, marginfit.tuning.cli\n"
        "sys.exit(int(dict(os.environ) != before))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=300).returncode == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "depth=3"], "marginfit-tune: Unknown hyperparameter 'depth'"),
        (["--set", "gamma=10:1"], "marginfit-tune: 'gamma' range (10, 1) has low > high"),
        (["--data", "images/"], "marginfit-tune: Data 'images/' is neither"),
    ],
)
def test_search_command_errors_are_one_line(argv, message, tmp_path):
    from marginfit.tuning import cli as tuning_cli

    with pytest.raises(SystemExit) as stop:
        tuning_cli.main([*argv, "--output", str(tmp_path)])
    assert str(stop.value).startswith(message) and "\n" not in str(stop.value)


def test_training_watches_a_validation_split_of_the_training_data(tmp_path, monkeypatch):
    seen = {}
    original = marginfit.MarginModel.fit

    def spy(self, x, y, validation_data=None, **kwargs):
        seen["fit"], seen["validation"] = x, validation_data[0]
        return original(self, x, y, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(marginfit.MarginModel, "fit", spy)
    cli.run(["train", "--epochs", "1", "--validation-split", "0.2", "--output", str(tmp_path)])
    (x_train, _), _ = data.load_digits()
    fitted, validation = seen["fit"], seen["validation"]
    assert len(fitted) + len(validation) == len(x_train)
    assert abs(len(validation) - 0.2 * len(x_train)) <= 1
    # Both parts come from the training data: the test set is not watched.
    training = {example.tobytes() for example in x_train}
    assert all(example.tobytes() in training for example in np.concatenate([fitted, validation]))


def test_digits28_are_the_digits_resized_and_shifted():
    (x8, y8), (x8_test, y8_test) = data.load_digits(seed=2)
    (x28, y28), (x28_test, y28_test) = data.load_digits28(seed=2)
    assert x28.shape[1:] == (28, 28, 1) and x28.dtype == np.float32
    np.testing.assert_array_equal(y28, y8)  # the same split of the same digits
    np.testing.assert_array_equal(y28_test, y8_test)
    assert 0.0 <= x28.min() and x28.max() <= 1.0
    rows = np.nonzero(x28[..., 0].max(axis=2))
    top = np.array([rows[1][rows[0] == k].min() for k in range(len(x28))])
    bottom = np.array([rows[1][rows[0] == k].max() for k in range(len(x28))])
    assert np.all(bottom - top < 20)  # each digit fits its 20x20 box
    assert len(np.unique(top)) > 5  # placed at varying heights
    # Resizing by 20/8 keeps the mean intensity: the digit's ink scales by
    # (20/8)**2, up to the bilinear edges.
    ratio = x28.sum(axis=(1, 2, 3)) / x8.sum(axis=(1, 2, 3))
    assert np.all(np.abs(ratio / (20 / 8) ** 2 - 1) < 0.25), ratio.min()


def test_the_authors_preset_builds_their_configuration():
    args = parse("train", "--preset", "authors")
    assert (args.epochs, args.batch_size, args.optimizer, args.batchnorm, args.l2) == (
        200,
        256,
        "rmsprop",
        True,
        2.5e-4,
    )
    # Flags given as well override the preset.
    assert parse("train", "--preset", "authors", "--gamma", "100", "--no-batchnorm").gamma == 100
    assert not parse("train", "--preset", "authors", "--no-batchnorm").batchnorm
    x, y = digits(64)
    model, margin = args.build(x.shape[1:], 10)
    assert (margin.norm, margin.competitors, margin.top_k, margin.aggregation) == (
        np.inf,
        "top",
        1,
        "max",
    )
    assert margin.layers == ("input", "conv1", "conv2")
    # The authors weigh each layer by its number of activations.
    sizes = [np.prod(x.shape[1:])] + [
        np.prod(model.get_layer(name).output.shape[1:]) for name in ("conv1", "conv2")
    ]
    assert list(margin.layer_weights) == [float(s) for s in sizes]
    assert model.get_layer("conv1_linear").kernel.shape[:2] == (5, 5)
    assert model.get_layer("dense1_linear").units == 512
    assert isinstance(model.get_layer("conv1_norm"), keras.layers.BatchNormalization)
    l2 = model.get_layer("conv1_linear").kernel_regularizer
    assert isinstance(l2, keras.regularizers.L2) and np.isclose(l2.l2, 2.5e-4)
    for optimizer in model.optimizer.optimizers:
        assert isinstance(optimizer, keras.optimizers.RMSprop)
        assert not optimizer.use_ema  # the authors average no weights
        assert (optimizer.epsilon, optimizer.global_clipnorm) == (1e-2, 5.0)
        schedule = optimizer._learning_rate
        assert isinstance(schedule, keras.optimizers.schedules.ExponentialDecay)
        assert (schedule.initial_learning_rate, schedule.decay_steps) == (0.1, 2000)
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])


def test_the_robust_preset_is_the_documented_margin_beside_the_cross_entropy():
    args = parse("train", "--preset", "robust")
    x, y = digits(32)
    model, margin = args.build(x.shape[1:], 10)
    assert margin == marginfit.LargeMargin(
        ["input"],
        gamma=0.3,
        norm="inf",
        space="logits",
        competitors="top",
        balance=0.0,
        approximate=False,
    )
    assert model.margin == margin
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    # The cross-entropy at a tenth of the margin's weight.
    ce = float(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model.predict(x, verbose=0))
    )
    np.testing.assert_allclose(logs["loss"], 0.1 * ce + logs["margin_loss"], rtol=1e-5)
    assert ce > 0


def test_the_input_distance_of_a_linear_model_is_exact_in_pixels():
    """The reported distance at the input of a linear model is exact:
    ``min_j (z_y - z_j) / ||w_y - w_j||_1``, the L-inf distance to the
    decision region's boundary, in the units of the pixels."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    model = marginfit.MarginModel(
        inputs,
        keras.layers.Dense(10)(inputs),
        margin=marginfit.LargeMargin(
            ["input"], norm="inf", space="logits", competitors="top", epsilon=0.0
        ),
    )
    x, y = digits(16)
    x = x.reshape(16, 64)
    kernel, bias = model.get_weights()
    logits = x @ kernel + bias
    rows = np.arange(16)
    gaps = logits[rows, y][:, None] - logits  # [16, 10]
    sizes = np.abs(kernel.T[y][:, None, :] - kernel.T[None]).sum(axis=-1)  # [16, 10]
    ratios = np.where(np.eye(10)[y] > 0, np.inf, gaps / np.where(sizes > 0, sizes, 1))
    expected = ratios.min(axis=1)
    np.testing.assert_allclose(model.margin_distances(x, y)["input"], expected, rtol=1e-5)


@pytest.mark.parametrize("epochs", [1, 2, 10, 60, 200])
def test_weight_average_spans_at_most_a_tenth_of_the_run(epochs):
    """The average spans 1 / (1 - momentum) steps: --ema's 100 steps where
    the run is ten times longer, else a tenth of the run."""
    args = parse("train", "--epochs", str(epochs))
    (x_train, _), _ = data.load_digits()
    batches = np.ceil(len(x_train) * (1 - args.validation_split) / args.batch_size)
    steps = epochs * batches
    momentum = args.ema_momentum(len(x_train))
    assert 0 <= momentum <= args.ema
    assert 1 / (1 - momentum) <= 0.1 * steps * (1 + 1e-9) or momentum == 0
    if steps >= 10 / (1 - args.ema):
        assert momentum == args.ema
    else:
        assert np.isclose(1 / (1 - momentum), max(1.0, 0.1 * steps))
    assert parse("train", "--ema", "0").ema_momentum(len(x_train)) is None
    assert parse("train", "--preset", "authors").ema_momentum(len(x_train)) is None


def test_validation_logs_and_the_saved_model_use_the_averaged_weights(tmp_path, monkeypatch):
    """With --ema, the last epoch's val_ logs are those of the model fit()
    leaves, which holds the average; the last training weights differ."""
    args = parse("train", "--epochs", "3", "--ema", "0.9")
    train, test = data.load_digits()
    train = (train[0][:400], train[1][:400])
    model, _ = args.build(train[0].shape[1:], 10, "cross-entropy", num_examples=400)
    last = {}
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: last.update(
            weights=[w.numpy() for w in model.trainable_weights]
        )
    )
    original = marginfit.MarginModel.fit

    def with_record(self, *args, callbacks=(), **kwargs):
        return original(self, *args, callbacks=[*callbacks, record], **kwargs)

    monkeypatch.setattr(marginfit.MarginModel, "fit", with_record)
    history, _ = cli.fit(args, model, (train, test), str(tmp_path), verbose=0)
    _, validation = data.split(*train, args.validation_split, args.seed)
    logs = model.evaluate(*validation, return_dict=True, verbose=0)
    # The swap in and out adds and subtracts weights: float32 rounding only.
    np.testing.assert_allclose(history["val_loss"][-1], logs["loss"], rtol=1e-5)
    assert not all(
        np.allclose(w, v, rtol=1e-3) for w, v in zip(model.trainable_weights, last["weights"])
    )
