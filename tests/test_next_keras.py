"""The core, saving and real-model tests on the next Keras (the wheel in
``../shared/wheels``, Keras' main branch), in a fresh virtual environment
made by `tools/next_keras.py`; skipped where there is no such wheel."""

import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import next_keras  # noqa: E402

TESTS = [
    "tests/test_keras_internals.py",
    "tests/test_margin.py",
    "tests/test_model.py",
    "tests/test_saving.py",
    "tests/test_real_models.py",
]
"""The core (the margin's math and the model against the reference, the
registry of Keras internals), saving and real-model tests."""


def test_the_core_saving_and_real_model_tests_pass_on_the_next_keras(tmp_path):
    wheel = next_keras.newest_wheel()
    if wheel is None:
        pytest.skip(f"no Keras wheel in {next_keras.WHEELS}")
    version = os.path.basename(wheel).split("-")[1]  # keras-<version>-py3-none-any.whl
    if keras.__version__ == version:
        pytest.skip(f"this suite runs on Keras {version} already")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "next_keras.py"), "--wheel", wheel]
        + ["--venv", str(tmp_path / "venv"), "-q", *TESTS],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"keras {version}\n" in done.stdout
    assert " passed" in done.stdout.splitlines()[-1]
