"""A training run killed mid-epoch and restarted with
`marginfit.BackupAndRestore` ends with the weights of an uninterrupted run,
on one process and on a cluster of two workers."""

import contextlib
import os
import random
import signal
import subprocess

import numpy as np
import pytest
from helpers import processes, skip_without, wait_all

from marginfit.cluster import free_ports

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "resume_worker.py")
TIMEOUT = 600
STEPS_PER_EPOCH = 8
KILLS = 3


def final_weights(directory, index=""):
    with np.load(os.path.join(directory, f"final{index}.npz")) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def commands(directory, cluster_ports):
    """One process, or one per worker of a localhost cluster."""
    if cluster_ports is None:
        return [[SCRIPT, directory]]
    ports = ",".join(map(str, cluster_ports))
    return [[SCRIPT, directory, str(i), ports] for i in range(len(cluster_ports))]


@contextlib.contextmanager
def started(directory, cluster_ports=None, backend="tensorflow"):
    """Starts a run's processes on a Keras backend, which import and build
    their model but train only once told to (`go`): a test starts the next
    run while the last one trains. Kills and reaps them on the way out."""
    with processes(
        commands(directory, cluster_ports),
        env={**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as run:
        yield run


def go(run):
    for process in run:
        process.stdin.write("go\n")
        process.stdin.flush()


def finish(run):
    """Lets the run train to its end; checks that every process succeeded."""
    go(run)
    for code, _, stderr in wait_all(run, TIMEOUT):
        assert code == 0, stderr[-3000:]


def kill_at(run, epoch, batch, victim=0):
    """Lets the run train and SIGKILLs process ``victim`` (then the rest of
    the cluster) once step ``batch`` of ``epoch`` has finished."""
    go(run)
    for line in run[0].stdout:
        if line.split() == ["step", str(epoch), str(batch)]:
            break
    else:
        pytest.fail("the training ended before the kill point")
    run[victim].send_signal(signal.SIGKILL)
    run[victim].wait(timeout=60)
    for process in run:  # the cluster restarts as a whole
        process.kill()
        process.wait(timeout=60)


def assert_same_weights(actual, expected):
    for a, b in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def assert_nothing_left(directory):
    names = set(os.listdir(directory))
    assert not any(name.startswith(".marginfit-") for name in names), names
    assert "backup" not in names  # deleted once fit() ends


def uninterrupted_weights(directory, backend="tensorflow"):
    """The final weights of an uninterrupted run in one process."""
    with started(directory, backend=backend) as run:
        finish(run)
    return final_weights(directory)


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory):
    return uninterrupted_weights(str(tmp_path_factory.mktemp("reference")))


def test_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, one_process_weights):
    chooser = random.Random(0)
    with contextlib.ExitStack() as stack:
        directories = [str(tmp_path / f"killed{kill}") for kill in range(KILLS)]
        for directory in directories:
            os.makedirs(directory)
        upcoming = stack.enter_context(started(directories[0]))
        for kill, directory in enumerate(directories):
            # Mid-epoch, in any epoch; backups are every 3 steps.
            epoch, batch = chooser.randrange(3), chooser.randrange(1, STEPS_PER_EPOCH - 1)
            resumed = stack.enter_context(started(directory))
            kill_at(upcoming, epoch, batch)
            assert not os.path.exists(os.path.join(directory, "final.npz"))
            if kill + 1 < KILLS:
                upcoming = stack.enter_context(started(directories[kill + 1]))
            finish(resumed)
            assert_same_weights(final_weights(directory), one_process_weights)
            assert_nothing_left(directory)


def test_killed_worker_resumes_the_cluster_to_the_same_weights(tmp_path):
    """A cluster of two workers, one killed mid-epoch, ends with the weights
    of the same cluster uninterrupted (that a cluster trains the weights of
    one process, Adam included, `test_multi_worker.py` checks in float64)."""
    reference, directory = str(tmp_path / "reference"), str(tmp_path / "killed")
    os.makedirs(reference)
    os.makedirs(directory)
    # Three clusters overlap in time: their ports are taken at once, so that
    # they differ.
    ports = free_ports(6)
    with (
        started(reference, ports[0:2]) as uninterrupted,
        started(directory, ports[2:4]) as killed,
    ):
        finish(uninterrupted)
        with started(directory, ports[4:6]) as resumed:
            kill_at(killed, 1, 4, victim=1)
            finish(resumed)
    expected = final_weights(reference, 0)
    assert_same_weights(final_weights(reference, 1), expected)
    for index in (0, 1):
        assert_same_weights(final_weights(directory, index), expected)
    assert_nothing_left(directory)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_killed_mid_epoch_on_another_backend_resumes_to_the_same_weights(tmp_path, backend):
    """The same on Keras' JAX and PyTorch backends: one kill mid-epoch,
    after a backup."""
    skip_without(backend)
    expected = uninterrupted_weights(str(tmp_path / "reference"), backend)
    directory = str(tmp_path / "killed")
    os.makedirs(directory)
    with started(directory, backend=backend) as run:
        kill_at(run, 1, 4)
    with started(directory, backend=backend) as run:
        finish(run)
    assert_same_weights(final_weights(directory), expected)
    assert_nothing_left(directory)
