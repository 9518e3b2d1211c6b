"""Saving that keeps the training logic: every round trip in a fresh process."""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import saving_worker
import tensorflow as tf
from helpers import CE, conv_net, digits

import marginfit

HERE = os.path.dirname(__file__)
ITERATIONS = saving_worker.EPOCHS * 3  # 96 examples in batches of 32


def run_worker(*arguments):
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "saving_worker.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Saved by one process, restored and resumed by another."""
    directory = str(tmp_path_factory.mktemp("saved"))
    run_worker("save", directory)
    return json.loads(run_worker("resume", directory).strip().splitlines()[-1])


@pytest.mark.parametrize("kind", saving_worker.FORMATS)
def test_restored_model_is_the_same_margin_model(report, kind):
    entry = report[kind]
    assert entry["class"] == "MarginModel" and entry["is_margin_model"]
    assert entry["margin_config"] == report["margin_config"]
    assert entry["optimizer_class"] == "MultiOptimizer"
    iterations = 0 if kind == "backup" else ITERATIONS  # backup: fresh model
    assert entry["sub_optimizers"] == [
        ["BacktrackingSGD", "head", iterations],
        ["Adam", "features", iterations],
    ]


@pytest.mark.parametrize("kind", [k for k in saving_worker.FORMATS if k != "backup"])
def test_restored_state_and_resumed_training_match(report, kind):
    entry = report[kind]
    assert entry["same_model_config"] and entry["same_optimizer_config"]
    assert entry["logs"].keys() == report["recorded_logs"].keys()
    for key, value in report["recorded_logs"].items():
        np.testing.assert_allclose(entry["logs"][key], value, rtol=1e-6, err_msg=key)
    assert entry["prediction_difference"] < 1e-6
    assert entry["optimizer_paths_match"]
    assert entry["optimizer_state_difference"] < 1e-7
    assert entry["resumed_weight_difference"] < 1e-6


def test_backup_and_restore_resumes_the_interrupted_epochs(report):
    entry = report["backup"]
    # Only the two epochs after the interruption ran, from the backed-up state.
    assert entry["epochs_run"] == [2, 3]
    assert entry["resumed_weight_difference"] < 1e-6


def test_saved_model_directory_serves(report):
    # tf.saved_model.load(...).serve, the serving_default signature and
    # keras.layers.TFSMLayer all reproduce the model's predictions.
    assert report["save_model"]["serve_difference"] < 1e-5


def test_components_survive_the_round_trip(report):
    components = report["components"]
    assert components["loss_class"] == "HuberLoss" and components["threshold"] == 2.5
    np.testing.assert_allclose(components["l1"]["l1"], 0.01, rtol=1e-6)
    assert components["norm_epsilon"] == 1e-3
    assert components["optimizer_class"] == "BacktrackingSGD"
    # iteration, learning rate, and two slots for each of the 6 variables.
    assert components["slot_count"] == 2 + 2 * 6
    assert components["loss_difference"] < 1e-6
    assert components["slot_difference"] < 1e-7
    assert components["resumed_weight_difference"] < 1e-6
    assert components["violation_rate_class"] == "ViolationRate"
    assert components["violation_rate_gamma"] == [0.5, 2.0]
    np.testing.assert_allclose(components["violation_rate"], 3 / 7, rtol=1e-6)


# ------------------------------------------------- errors, in this process


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model, its `.keras` file and its save_model directory."""
    directory = tmp_path_factory.mktemp("files")
    model, _ = conv_net(marginfit.LargeMargin(["input", "dense"], gamma=0.2))
    model.compile("adam", CE)
    x, y = digits(16)
    model.fit(x, y, verbose=0)
    model.save(directory / "model.keras")
    marginfit.save_model(model, directory / "saved_model")
    return model, directory


def rewritten(source, target, replace):
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            copy.writestr(name, replace(name, original.read(name)))
    return target


def damaged_files(directory):
    source = directory / "model.keras"
    truncated = directory / "truncated.keras"
    truncated.write_bytes(source.read_bytes()[:2000])
    text = directory / "text.keras"
    text.write_text("not a model")
    return {
        "truncated": (truncated, "not a Keras archive"),
        "text": (text, "not a Keras archive"),
        "config": (
            rewritten(
                source,
                directory / "config.keras",
                lambda name, data: b"{oops" if name == "config.json" else data,
            ),
            "Could not load the model",
        ),
        "weights": (
            rewritten(
                source,
                directory / "weights.keras",
                lambda name, data: data[: len(data) // 2] if name.endswith(".h5") else data,
            ),
            "Could not load the model",
        ),
        "missing": (directory / "absent.keras", "no such file or directory"),
    }


@pytest.mark.parametrize("case", ["truncated", "text", "config", "weights", "missing"])
def test_damaged_or_foreign_files_give_clear_errors(saved, case):
    _, directory = saved
    path, message = damaged_files(directory)[case]
    with pytest.raises(ValueError, match=message):
        marginfit.load_model(path)


def test_serving_only_saved_model_is_refused_with_the_reason(saved, tmp_path):
    model, _ = saved
    model.export(str(tmp_path / "exported"), verbose=False)
    with pytest.raises(ValueError, match="serving graph only"):
        marginfit.load_model(tmp_path / "exported")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a SavedModel"):
        marginfit.load_model(tmp_path / "plain")


def test_save_model_never_replaces_foreign_files_or_leaves_half_a_model(saved, tmp_path):
    model, directory = saved
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a SavedModel"):
        marginfit.save_model(model, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        marginfit.save_model(model, directory / "saved_model", overwrite=False)
    # A failing save (an unbuilt model) leaves the previous model intact.
    target = tmp_path / "model"
    marginfit.save_model(model, target)
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError):
        marginfit.save_model(unbuilt, target)
    x, _ = digits(4)
    restored = marginfit.load_model(target)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    assert [p for p in os.listdir(tmp_path) if p.startswith(".marginfit-")] == []


def test_save_model_replaces_its_own_kind(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "model"
    marginfit.save_model(model, target)
    other, _ = conv_net(marginfit.LargeMargin(["input"], gamma=0.3), seed=5)
    other.compile("sgd", CE)
    marginfit.save_model(other, target)
    restored = marginfit.load_model(target)
    assert restored.margin == other.margin


def test_save_model_serves_the_input_signature_it_is_given(saved, tmp_path):
    model, _ = saved
    signature = [keras.InputSpec(shape=(3, 8, 8, 1), dtype="float32")]
    marginfit.save_model(model, tmp_path / "fixed", input_signature=signature)
    served = tf.saved_model.load(str(tmp_path / "fixed"))
    (spec,) = tf.nest.flatten(served.signatures["serving_default"].structured_input_signature)
    assert spec.shape.as_list() == [3, 8, 8, 1]
    x, _ = digits(3)
    np.testing.assert_allclose(served.serve(x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert marginfit.load_model(tmp_path / "fixed").margin == model.margin
