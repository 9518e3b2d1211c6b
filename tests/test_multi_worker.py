"""MarginModel under MultiWorkerMirroredStrategy: two worker processes on
localhost end where one process does, and stock Keras models stay as they
are."""

import json
import os
import subprocess
import sys

import pytest
import rounding
from helpers import DISTRIBUTION_MARGINS, processes, wait_all

from marginfit.cluster import free_ports, local_tf_config

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "multi_worker_fit.py")
TIMEOUT = 600


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The single-process report and the two workers' reports."""
    directory = tmp_path_factory.mktemp("multi_worker")
    ports = ",".join(map(str, free_ports(2)))
    paths = [str(directory / name) for name in ("single.json", "worker0.json", "worker1.json")]
    commands = [
        [SCRIPT, paths[0]],
        [SCRIPT, paths[1], "0", ports],
        [SCRIPT, paths[2], "1", ports],
    ]
    with processes(commands, stderr=subprocess.PIPE, text=True) as started:
        for code, _, stderr in wait_all(started, TIMEOUT):
            assert code == 0, stderr[-3000:]
    loaded = []
    for path in paths:
        with open(path) as file:
            loaded.append(json.load(file))
    return loaded


@pytest.mark.parametrize("kind", [*DISTRIBUTION_MARGINS, "defaults+sam"])
def test_two_workers_end_where_one_process_does(reports, kind):
    """Two workers of two replicas sum the same gradients in another order
    than one process; after 8 steps (float64, bounds in `rounding`) the
    weights, the training logs and the evaluation logs (distances included)
    are those of one process, with the library's defaults, with exact
    second-order gradients, with the authors' loss and with the defaults
    under `marginfit.SAM` (perturbed with the all-reduced gradient)."""
    single, *workers = reports
    assert single["replicas"] == 1
    assert single[kind]["max_weight_change"] > 1e-2
    if kind == "defaults+sam":  # SAM's perturbation changes the updates
        plain = single["defaults"]["weights"]
        assert rounding.max_difference(single[kind]["weights"], plain) > 1e-4
    for worker in workers:
        assert worker["replicas"] == 2
        rounding.assert_same_weights(worker[kind]["weights"], single[kind]["weights"])
        for section in ("logs", "evaluation"):
            rounding.assert_same_logs(worker[kind][section], single[kind][section], batch=16)


def test_stock_keras_models_are_left_alone():
    """The workaround lives in MarginModel: plain Keras classes keep their
    methods, and a stock model beside ours trains as before."""
    code = (
        "import keras, marginfit\n"
        "from keras.src.backend.tensorflow.trainer import TensorFlowTrainer as T\n"
        "assert keras.Model._maybe_symbolic_build is T._maybe_symbolic_build\n"
        "assert keras.Model.make_train_function is T.make_train_function\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_train_command_on_two_workers_writes_once(tmp_path):
    """`marginfit train` under TF_CONFIG: both workers train their shards;
    only the chief writes the outputs; the other worker's temporary
    directory is gone afterwards."""
    output = tmp_path / "run"
    ports = free_ports(2)
    commands, environments = [], []
    for index in range(2):
        scratch = tmp_path / f"tmp{index}"
        scratch.mkdir()
        environments.append(
            {**os.environ, "TF_CONFIG": local_tf_config(ports, index), "TMPDIR": str(scratch)}
        )
        commands.append(["-m", "marginfit.cli", "train", "--epochs", "2", "--output", str(output)])
    with (
        processes(
            commands[:1],
            env=environments[0],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as chief,
        processes(
            commands[1:],
            env=environments[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as worker,
    ):
        results = wait_all(chief + worker, TIMEOUT)
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    assert sorted(os.listdir(output)) == ["history.csv", "model.keras", "summary.json"]
    assert os.listdir(tmp_path / "tmp1") == []
    with open(output / "summary.json") as file:
        summary = json.load(file)
    with open(output / "history.csv") as file:
        assert len(file.read().strip().splitlines()) == 3  # header and 2 epochs
    # Both workers evaluated the one model that the chief saved.
    printed = [line for _, stdout, _ in results for line in stdout.splitlines()]
    accuracies = {line.split()[2].rstrip(";") for line in printed if line.startswith("test acc")}
    assert accuracies == {f"{summary['test']['accuracy']:.4f}"}
