"""Every example runs (short settings) and does what it says."""

import importlib.util
import os

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart():
    logs = example("quickstart").main(["--epochs", "2"])
    assert logs["accuracy"] > 0.5 and "distance_input" in logs


def test_functional_callbacks(tmp_path):
    logs = example("functional_callbacks").main(["--epochs", "2", "--output", str(tmp_path)])
    assert logs["accuracy"] > 0.3
    assert (tmp_path / "best.keras").exists()
    header = (tmp_path / "history.csv").read_text().splitlines()[0]
    assert "val_margin_loss" in header and "distance_hidden" in header
    assert os.listdir(tmp_path / "tensorboard")


def test_subclassed():
    logs = example("subclassed").main(["--epochs", "2"])
    assert logs["accuracy"] > 0.5
    assert np.isfinite(logs["distance_hidden"])


def test_discriminative_lr():
    logs = example("discriminative_lr").main(["--epochs", "6"])
    # Halved once after 5 epochs, ratio 4 kept.
    assert logs["rates"]["features"] == pytest.approx(1e-3)
    assert logs["rates"]["head"] == pytest.approx(2.5e-4)


def test_save_and_serve(tmp_path):
    results = example("save_and_serve").main(["--epochs", "1", "--output", str(tmp_path)])
    assert results["serving_difference"] < 1e-5
    assert (tmp_path / "saved_model" / "saved_model.pb").exists()


def test_tuning_search(tmp_path):
    results = example("tuning_search").main(
        ["--trials", "2", "--epochs", "1", "--output", str(tmp_path)]
    )
    assert len(results["rows"]) == 2
    np.testing.assert_allclose(results["margin_loss"], results["rows"][0]["score"], rtol=1e-5)


def test_multi_worker(tmp_path):
    output = tmp_path / "run"
    results = example("multi_worker").main(
        ["--local-workers", "2", "--epochs", "2", "--output", str(output)]
    )
    # Two workers of one replica each; only the chief wrote, and the backup
    # was removed once training ended.
    assert results["workers"] == 2 and results["epochs"] == 2
    assert sorted(os.listdir(output)) == ["model.keras", "results.json"]
    assert results["test"]["accuracy"] > 0.3
