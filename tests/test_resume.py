"""A training run killed mid-epoch and restarted with
`marginfit.BackupAndRestore` ends with the weights of an uninterrupted run,
on one process and on a cluster of two workers."""

import os
import random
import signal
import subprocess

import numpy as np
import pytest
from helpers import processes, wait_all

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


def run_to_end(directory, cluster_ports=None):
    """Runs (or resumes) the training to its end."""
    with processes(
        commands(directory, cluster_ports),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as started:
        for code, _, stderr in wait_all(started, TIMEOUT):
            assert code == 0, stderr[-3000:]


def kill_at(directory, epoch, batch, cluster_ports=None, victim=0):
    """Starts the training and SIGKILLs process ``victim`` (then the rest of
    the cluster) once step ``batch`` of ``epoch`` has finished."""
    with processes(
        commands(directory, cluster_ports),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as started:
        for line in started[0].stdout:
            if line.split() == ["step", str(epoch), str(batch)]:
                break
        else:
            pytest.fail("the training ended before the kill point")
        started[victim].send_signal(signal.SIGKILL)
        started[victim].wait(timeout=60)
    # `processes` kills the rest: the cluster restarts as a whole.


def assert_same_weights(actual, expected):
    for a, b in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def assert_nothing_left(directory):
    names = set(os.listdir(directory))
    assert not any(name.startswith(".marginfit-") for name in names), names
    assert "backup" not in names  # deleted once fit() ends


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory):
    """The final weights of an uninterrupted run in one process."""
    directory = str(tmp_path_factory.mktemp("reference"))
    run_to_end(directory)
    return final_weights(directory)


def test_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, one_process_weights):
    chooser = random.Random(0)
    for kill in range(KILLS):
        directory = str(tmp_path / f"killed{kill}")
        os.makedirs(directory)
        # Mid-epoch, in any epoch; backups are every 3 steps.
        epoch, batch = chooser.randrange(3), chooser.randrange(1, STEPS_PER_EPOCH - 1)
        kill_at(directory, epoch, batch)
        assert not os.path.exists(os.path.join(directory, "final.npz"))
        run_to_end(directory)
        assert_same_weights(final_weights(directory), one_process_weights)
        assert_nothing_left(directory)


def test_killed_worker_resumes_the_cluster_to_the_same_weights(tmp_path, one_process_weights):
    """Also the same weights as one process: the default margin is the same
    function of the global batch on one process and on two workers."""
    reference = str(tmp_path / "reference")
    os.makedirs(reference)
    run_to_end(reference, free_ports(2))
    expected = final_weights(reference, 0)
    assert_same_weights(final_weights(reference, 1), expected)
    for ours, theirs in zip(expected, one_process_weights, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    directory = str(tmp_path / "killed")
    os.makedirs(directory)
    kill_at(directory, 1, 4, free_ports(2), victim=1)
    run_to_end(directory, free_ports(2))
    for index in (0, 1):
        assert_same_weights(final_weights(directory, index), expected)
    assert_nothing_left(directory)
