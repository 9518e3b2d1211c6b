"""keras-tuner searches over MarginHyperModel: real trials on small data."""

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import digits

import marginfit
from marginfit import tuning
from marginfit.experiments import Experiment

X_TRAIN, Y_TRAIN = digits(192)
X_VAL, Y_VAL = digits(96, offset=192)
FIT = dict(validation_data=(X_VAL, Y_VAL), batch_size=64, verbose=0)
# Small networks keep each trial to a few seconds.
SMALL = dict(conv_filters=[4, 8], dense_units=[8, 16], conv_layers=(0, 1), dense_layers=(1, 2))
HYPERMODEL = tuning.MarginHyperModel(input_shape=(8, 8, 1), num_classes=10)

# What every fit() of a search saw, appended by `Recorder` (keras-tuner
# deep-copies callbacks per trial, so they report to this module-level list).
SEEN = []


class Recorder(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        model = self.model
        SEEN.append(
            {
                "margin": model.margin.get_config(),
                "rates": {o.name: float(o.learning_rate) for o in model.optimizer.optimizers},
                "conv": [x.filters for x in model.layers if isinstance(x, keras.layers.Conv2D)],
                "dense": [x.units for x in model.layers if isinstance(x, keras.layers.Dense)][:-1],
            }
        )


def make_tuner(kind, objective, directory, space=None, **options):
    """A tuner over HYPERMODEL, narrowed to SMALL and ``space``."""
    hp = tuning.hyperparameters(HYPERMODEL, {**SMALL, **(space or {})})
    return tuning.make_tuner(
        kind, HYPERMODEL, objective, str(directory), hyperparameters=hp, **options
    )


def expected_margin_layers(placement, hidden):
    layers = []
    for part in placement.split("+"):
        layers += ["input"] if part == "input" else hidden[-1:] if part == "last_hidden" else hidden
    return layers


def test_random_search_trains_the_models_its_trials_report(tmp_path):
    SEEN.clear()
    tuner = make_tuner("random", "val_accuracy", tmp_path, max_trials=3, seed=1)
    tuner.search(X_TRAIN, Y_TRAIN, epochs=1, callbacks=[Recorder()], **FIT)
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: int(t.trial_id))
    assert [t.status for t in trials] == ["COMPLETED"] * 3
    assert len(SEEN) == 3
    for trial, seen in zip(trials, SEEN):
        values = trial.hyperparameters.values
        hidden = [f"conv{i + 1}" for i in range(values["conv_layers"])] + [
            f"dense{i + 1}" for i in range(values["dense_layers"])
        ]
        assert seen["margin"]["gamma"] == pytest.approx(
            [values["gamma"]] * len(seen["margin"]["layers"])
        )
        assert seen["margin"]["layers"] == expected_margin_layers(values["margin_layers"], hidden)
        assert seen["margin"]["norm"] == ("inf" if values["norm"] == "inf" else int(values["norm"]))
        assert seen["rates"] == pytest.approx(
            {"features": values["lower_learning_rate"], "head": values["upper_learning_rate"]},
            rel=1e-6,
        )
        assert seen["conv"] == [values["conv_filters"]] * values["conv_layers"]
        assert seen["dense"] == [values["dense_units"]] * values["dense_layers"]
    # The space really varies between trials.
    assert len({json.dumps(t.hyperparameters.values, sort_keys=True) for t in trials}) == 3
    assert len({seen["margin"]["gamma"][0] for seen in SEEN}) == 3
    assert_best_is_best(tuner, "max")


def assert_best_is_best(tuner, direction):
    rows = tuning.results(tuner)
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=direction == "max")
    assert rows[0]["trial"] == tuner.oracle.get_best_trials(1)[0].trial_id
    # The best model is the best trial's best epoch, optimizer state included.
    best = tuning.best_model(tuner)
    name = tuner.oracle.objective.name
    logs = best.evaluate(X_VAL, Y_VAL, batch_size=64, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs[name.removeprefix("val_")], rows[0]["score"], rtol=1e-5)
    assert all(int(o.iterations) > 0 for o in best.optimizer.optimizers)


def test_bayesian_optimization_minimises_the_margin_loss(tmp_path):
    tuner = make_tuner("bayesian", "val_margin_loss", tmp_path, max_trials=3)
    assert tuner.oracle.objective.direction == "min"
    tuner.search(X_TRAIN, Y_TRAIN, epochs=1, **FIT)
    assert len(tuning.results(tuner)) == 3
    assert_best_is_best(tuner, "min")


def test_hyperband_on_a_distance_objective(tmp_path):
    # With the margin fixed on the input, every trial logs val_distance_input.
    tuner = make_tuner(
        "hyperband", "val_distance_input", tmp_path, {"margin_layers": "input"}, epochs=3
    )
    assert tuner.oracle.objective.direction == "max"
    tuner.search(X_TRAIN, Y_TRAIN, **FIT)
    rows = tuning.results(tuner)
    assert len(rows) >= 3
    assert_best_is_best(tuner, "max")


class Interrupt(keras.callbacks.Callback):
    """Stops the whole search during its ``at``-th fit()."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_begin(self, logs=None):
        if len(SEEN) == self.at:
            raise KeyboardInterrupt


def test_an_interrupted_search_resumes_without_redoing_finished_trials(tmp_path):
    SEEN.clear()
    first = make_tuner("random", "val_accuracy", tmp_path, max_trials=3, seed=3)
    with pytest.raises(KeyboardInterrupt):
        first.search(X_TRAIN, Y_TRAIN, epochs=1, callbacks=[Recorder(), Interrupt(at=2)], **FIT)
    assert len(SEEN) == 2  # trial 0 finished, trial 1 interrupted
    finished = {
        t.trial_id: t.score for t in first.oracle.trials.values() if t.status == "COMPLETED"
    }
    assert list(finished) == ["0"]

    SEEN.clear()
    resumed = make_tuner("random", "val_accuracy", tmp_path, max_trials=3, seed=3)
    resumed.search(X_TRAIN, Y_TRAIN, epochs=1, callbacks=[Recorder()], **FIT)
    trials = resumed.oracle.trials
    assert sorted(trials) == ["0", "1", "2"]
    assert all(t.status == "COMPLETED" for t in trials.values())
    assert trials["0"].score == finished["0"]
    # Only the interrupted trial and the remaining one ran.
    assert len(SEEN) == 2


@pytest.mark.parametrize(
    "space, message",
    [
        (dict(gamma=0.0), "`gamma` must be a positive"),
        (dict(gamma=(-1.0, 10.0)), "does not support negative values"),
        (dict(gamma=(10.0, 1.0)), "low > high"),
        (dict(margin_layers=[]), "empty choice"),
        (dict(margin_layers=["output"]), "Unknown margin placement 'output'"),
        (dict(norm=3), "Unsupported `norm=3`"),
        (dict(conv_layers=(0, 1), dense_layers=(0, 2)), "at least one hidden layer"),
        (dict(depth=3), "Unknown hyperparameter 'depth'"),
        (dict(norm=(1, 2)), "'norm' takes a (low, high) range only if it is numeric"),
    ],
)
def test_bad_settings_fail_before_the_search(space, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_tuner("random", "val_accuracy", tmp_path, space)


def test_bad_fixed_margin_options_fail_at_construction():
    with pytest.raises(ValueError, match="alpha"):
        tuning.MarginHyperModel((8, 8, 1), 10, experiment=Experiment(alpha=0.0))
    with pytest.raises(ValueError, match="input_shape"):
        tuning.MarginHyperModel(input_shape=(8, 8), num_classes=10)


def test_the_space_is_declared_in_build_and_fixed_through_hyperparameters():
    declared = tuning.declared(HYPERMODEL)
    assert set(declared) == {
        "conv_layers",
        "conv_filters",
        "dense_units",
        "dense_layers",
        "norm",
        "margin_layers",
        "gamma",
        "lower_learning_rate",
        "upper_learning_rate",
        "ce_weight",
    }
    assert declared["gamma"].sampling == "log"
    hp = tuning.hyperparameters(
        HYPERMODEL,
        {
            "gamma": 50.0,
            "norm": "inf",
            "margin_layers": "input+last_hidden",
            "conv_layers": 1,
            "dense_layers": 1,
            "lower_learning_rate": (1e-3, 1e-2),
        },
    )
    assert hp.get("gamma") == 50.0
    # A narrowed range keeps the sampling it is declared with.
    assert [e.sampling for e in hp.space if e.name == "lower_learning_rate"] == ["log"]
    model = HYPERMODEL.build(hp)
    assert model.margin.gamma == (50.0, 50.0)
    assert model.margin.layers == ("input", "dense1")
    assert model.margin.get_config()["norm"] == "inf"


def test_objective_directions():
    assert tuning.objective("val_violation_rate").direction == "min"
    assert tuning.objective("distance_dense1").direction == "max"
    assert tuning.objective("val_auc:max").direction == "max"
    assert tuning.objective("val_accuracy") == "val_accuracy"  # keras-tuner infers it
    with pytest.raises(ValueError, match="'val_custom:min' or 'val_custom:max'"):
        tuning.objective("val_custom")


def run(*command, cwd):
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_command_line_search_and_best_model_in_a_fresh_process(tmp_path):
    x, y = digits(300)
    np.savez(tmp_path / "data.npz", x=x[..., 0], y=y)  # [n, 8, 8]: a channel is added
    output = tmp_path / "out"
    stdout = run(
        "-m",
        "marginfit.tuning",
        "--data",
        str(tmp_path / "data.npz"),
        "--trials",
        "2",
        "--epochs",
        "1",
        "--objective",
        "val_margin_loss",
        "--output",
        str(output),
        "--set",
        "conv_filters=4",
        "--set",
        "dense_units=8,16",
        "--set",
        "gamma=0.1:10",
        cwd=tmp_path,
    )
    rows = json.loads((output / "results.json").read_text())
    assert len(rows) == 2 and rows[0]["score"] <= rows[1]["score"]
    assert all(row["conv_filters"] == 4 and 0.1 <= row["gamma"] <= 10 for row in rows)
    assert "val_margin_loss" in stdout and "gamma" in stdout
    assert (output / "results.csv").read_text().count("\n") == 3
    best = json.loads((output / "best.json").read_text())
    np.testing.assert_allclose(best["validation"]["margin_loss"], rows[0]["score"], rtol=1e-5)
    # The saved best model reloads in a fresh process to the same numbers.
    check = (
        "import json, keras, marginfit, sys\n"
        "(_, _), (x, y) = marginfit.data.load_npz(sys.argv[1])\n"
        "model = keras.models.load_model(sys.argv[2])\n"
        "print(json.dumps(model.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)))\n"
    )
    reloaded = json.loads(
        run("-c", check, str(tmp_path / "data.npz"), str(output / "best.keras"), cwd=tmp_path)
        .strip()
        .splitlines()[-1]
    )
    for key, value in best["validation"].items():
        np.testing.assert_allclose(reloaded[key], value, rtol=1e-6, err_msg=key)


def test_npz_errors_name_the_problem(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 3)), labels=np.zeros(4))
    with pytest.raises(ValueError, match="needs `x`"):
        marginfit.data.load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "onehot.npz", x=np.zeros((4, 3)), y=np.eye(4))
    with pytest.raises(ValueError, match="received x"):
        marginfit.data.load_npz(tmp_path / "onehot.npz")
    (tmp_path / "text.npz").write_text("nope")
    with pytest.raises(ValueError, match="Could not read"):
        marginfit.data.load_npz(tmp_path / "text.npz")


def test_every_trial_adds_the_hypermodel_s_other_penalties(tmp_path):
    """`MarginHyperModel(penalties=...)`: each trial trains the searched
    margin and the other penalties, a fresh copy of each, and logs both."""
    extra = marginfit.InputGradientPenalty(weight=0.5)
    hypermodel = tuning.MarginHyperModel((8, 8, 1), 10, penalties=[extra])
    hp = tuning.hyperparameters(hypermodel, SMALL)
    tuner = tuning.make_tuner(
        "random", hypermodel, "val_accuracy", str(tmp_path), hyperparameters=hp, max_trials=1
    )
    built = []
    record = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: built.append(1))
    tuner.search(X_TRAIN, Y_TRAIN, epochs=1, callbacks=[record], **FIT)
    (trial,) = tuner.oracle.trials.values()
    model = tuner.load_model(trial)
    margin, penalty = model.penalty.penalties
    assert list(margin.gamma) == pytest.approx(
        [trial.hyperparameters.get("gamma")] * len(margin.layers)
    )
    assert penalty == extra and penalty is not extra
    assert {"input_gradient_loss", "margin_loss"} <= set(trial.metrics.metrics)
    assert built == [1]


def test_a_hypermodel_refuses_a_second_margin_with_the_fix():
    with pytest.raises(ValueError, match=r"two penalties named \['margin'\]"):
        tuning.MarginHyperModel((8, 8, 1), 10, penalties=[marginfit.LargeMargin(["input"])])
