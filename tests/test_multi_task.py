"""Models with several outputs or inputs (`multi_task_checks`): on
TensorFlow in this process, on JAX and PyTorch in a fresh one each."""

import os
import subprocess
import sys

import multi_task_checks
import pytest
from helpers import skip_without

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("check", multi_task_checks.CHECKS, ids=lambda c: c.__name__)
def test_on_tensorflow(check):
    check()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_on_the_other_backends(backend):
    skip_without(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"}
    finished = subprocess.run(
        [sys.executable, os.path.join(HERE, "multi_task_checks.py")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    passed = [line.split()[0] for line in finished.stdout.splitlines() if line.endswith("passed")]
    assert passed == [check.__name__ for check in multi_task_checks.CHECKS]
