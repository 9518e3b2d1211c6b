"""`marginfit-tune` as keras-tuner's distributed search: a chief and two
workers on localhost run every trial once, and a worker killed mid-trial
does not stall the search."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from helpers import processes, wait_all

from marginfit import tuning
from marginfit.cluster import free_ports
from marginfit.tuning import distributed
from marginfit.tuning.hypermodel import MarginHyperModel

TIMEOUT = 600
TRIALS = 4
SMALL = ["--set", "conv_filters=4", "--set", "dense_units=8", "--set", "conv_layers=1"]


def search_commands(output, epochs):
    return ["-m", "marginfit.tuning", "--trials", str(TRIALS), "--epochs", str(epochs)] + [
        "--output",
        str(output),
        # Ten heartbeats (a live worker is never silent that long, however
        # slow its epochs), and longer than the survivor needs for the
        # other trials: it must wait for the dead worker's trial rather
        # than stop.
        "--worker-timeout",
        "20",
        *SMALL,
    ]


def environments(port):
    base = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port)}
    return [{**base, "KERASTUNER_TUNER_ID": tuner} for tuner in ("chief", "tuner0", "tuner1")]


def start(output, epochs, **options):
    """The chief and two workers, each its own `processes` context."""
    (port,) = free_ports(1)
    return [
        processes([search_commands(output, epochs)], env=environment, text=True, **options)
        for environment in environments(port)
    ]


def assert_every_trial_once(output):
    rows = json.loads((output / "results.json").read_text())
    assert sorted(row["trial"] for row in rows) == [str(i) for i in range(TRIALS)]
    assert (output / "best.keras").exists()
    best = json.loads((output / "best.json").read_text())
    assert best["trial"] == rows[0]["trial"]
    return rows


def test_chief_and_two_workers_run_every_trial_once(tmp_path):
    output = tmp_path / "search"
    contexts = start(output, 1, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with contexts[0] as chief, contexts[1] as first, contexts[2] as second:
        results = wait_all(chief + first + second, TIMEOUT)
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    assert_every_trial_once(output)
    # Both workers trained (the chief runs no trial).
    for _, stdout, _ in results[1:]:
        assert "val_margin_loss" in stdout, stdout[-2000:]


def test_a_worker_killed_mid_trial_does_not_stall_the_search(tmp_path):
    output = tmp_path / "search"
    contexts = start(output, 3, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with contexts[0] as chief, contexts[1] as first, contexts[2] as second:
        # Kill the first worker once it is training a trial.
        for line in first[0].stdout:
            if "step - " in line:
                break
        else:
            pytest.fail("the worker ended before running a trial")
        first[0].send_signal(signal.SIGKILL)
        first[0].wait(timeout=60)
        results = wait_all(chief + second, TIMEOUT)
    for code, stdout, _ in results:
        assert code == 0, stdout[-3000:]
    assert "is handed to another worker" in results[0][1]
    assert_every_trial_once(output)


def test_a_beating_worker_keeps_its_trial_and_a_silent_one_loses_it(tmp_path):
    """On the chief, a worker whose `Heartbeat` beats keeps its trial for
    three timeouts, however long it trains; a silent one loses its trial,
    and so does the first once it stops beating (in one process: the
    chief's oracle, and heartbeats ten times shorter than the timeout)."""
    hypermodel = MarginHyperModel(input_shape=(8, 8, 1), num_classes=10)
    oracle = tuning.make_tuner("random", hypermodel, "val_accuracy", str(tmp_path)).oracle
    stop = threading.Event()
    watch = distributed.watch_workers(oracle, timeout=1.0, interval=0.1, stop=stop)
    try:
        beating, silent = (oracle.create_trial(worker) for worker in ("tuner0", "tuner1"))
        heartbeat = distributed.Heartbeat(oracle, beating.trial_id, interval=0.1)
        time.sleep(3.0)
        heartbeat.stop()
        # Ended trials leave `ongoing_trials` (as FAILED: no retries here).
        assert set(oracle.ongoing_trials) == {"tuner0"}
        assert (beating.status, silent.status) == ("RUNNING", "FAILED")
        time.sleep(2.0)
        assert (set(oracle.ongoing_trials), beating.status) == (set(), "FAILED")
    finally:
        stop.set()
        watch.join()
