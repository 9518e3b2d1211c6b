"""Trains the same models on one device and under
`keras.distribution.DataParallel` (JAX), on the same global batches, for
`test_backends.py`.

``python jax_distribution_fit.py FOLDER``: on one device, and on two CPU
devices of one process; prints a JSON report and saves the one-device
weights and logs in ``FOLDER/single.json``.

``python jax_distribution_fit.py FOLDER PORT PROCESS``: one of two processes
joined by `keras.distribution.initialize` on ``localhost:PORT``, one CPU
device each; each process feeds its half of every global batch and saves
the weights and logs it ends with in ``FOLDER/process<PROCESS>.json``.
"""

import json
import os
import sys

PROCESSES = 2
MULTI_PROCESS = len(sys.argv) == 4
os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
if not MULTI_PROCESS:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # for the float64 runs (`rounding`)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from nets import DISTRIBUTION_MARGINS, conv_net, digits, float64  # noqa: E402
from rounding import max_difference  # noqa: E402

import marginfit  # noqa: E402

BATCH = 16
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def shard(arrays, process, count=PROCESSES):
    """Of each global batch of ``arrays``, the rows of ``process`` (as
    `keras.distribution` places them: process 0's devices first)."""
    local = BATCH // count
    rows = np.concatenate(
        [
            np.arange(start + process * local, start + (process + 1) * local)
            for start in range(0, len(arrays[0]), BATCH)
        ]
    )
    return [array[rows] for array in arrays]


RUNS = {**{name: (name, None) for name in DISTRIBUTION_MARGINS}, "defaults+sam": ("defaults", 0.05)}
"""Each one-process run's margin and SAM radius (None: no update rule)."""


def float64_net(margin, rho=None):
    """`conv_net` in float64 with sigmoid activations (Keras' `ops.tanh`
    computes in float32 on JAX whatever its input), with `marginfit.SAM`
    of radius ``rho`` where given."""
    rule = None if rho is None else marginfit.SAM(rho)
    regularizer = keras.regularizers.L2(1e-3)
    return conv_net(margin, regularizer=regularizer, activation="sigmoid", update_rule=rule)[0]


def train(run, initial, process=None):
    """Weights and last logs after 2 epochs of 4 batches (as
    `distributed_fit.py` does on TensorFlow), in float64 (`rounding` says
    why); ``process`` feeds that process's half of every batch."""
    margin, rho = RUNS[run]
    with float64():
        model = float64_net(DISTRIBUTION_MARGINS[margin], rho)
        model.set_weights(initial)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(keras.optimizers.SGD(0.05), loss=loss)
        x, y = digits(64, dtype="float64")
        weights = np.linspace(0.5, 1.5, len(x))
        batch = BATCH
        if process is not None:
            (x, y, weights), batch = shard((x, y, weights), process), BATCH // PROCESSES
        history = model.fit(
            x, y, sample_weight=weights, batch_size=batch, epochs=2, shuffle=False, verbose=0
        )
    logs = {key: float(values[-1]) for key, values in history.history.items()}
    return model.get_weights(), logs


def poisoned(initial, poison, process=None):
    """Weights and logs after one epoch over batches 1-4 where batch 2 has a
    NaN pixel (``poison``, in process 0's half), or over batches 1, 3, 4;
    ``process`` feeds that process's half of every batch."""
    model, _ = conv_net(DISTRIBUTION_MARGINS["defaults"])
    model.set_weights(initial)
    model.compile(keras.optimizers.Adam(0.01), loss=CE)
    x, y = digits(4 * BATCH)
    if poison:
        x = x.copy()
        x[BATCH + 3, 4, 4, 0] = np.nan
    else:
        keep = np.r_[0:BATCH, 2 * BATCH : 4 * BATCH]
        x, y = x[keep], y[keep]
    batch = BATCH
    if process is not None:
        (x, y), batch = shard((x, y), process), BATCH // PROCESSES
    # Batches from a generator: `fit()` checks arrays whole, NaN included.
    batches = ((x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch))
    history = model.fit(batches, epochs=1, verbose=0)
    return model.get_weights(), {key: float(v[-1]) for key, v in history.history.items()}


def save(path, runs):
    """``{run: (weights, logs)}`` as JSON (floats round-trip exactly)."""
    with open(path, "w") as file:
        json.dump(
            {run: [[w.tolist() for w in weights], logs] for run, (weights, logs) in runs.items()},
            file,
        )


def initial_weights():
    """The float64 initial weights of every float64 run."""
    with float64():
        return float64_net(None).get_weights()


def float32_initial_weights():
    return conv_net(None)[0].get_weights()


def one_process(folder):
    initial = initial_weights()
    single = {run: train(run, initial) for run in RUNS}
    save(os.path.join(folder, "single.json"), single)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    parallel = {run: train(run, initial) for run in RUNS}
    clean, bad = (poisoned(float32_initial_weights(), poison) for poison in (False, True))
    report = {"devices": len(jax.devices()), "margins": {}}
    for run in RUNS:
        report["margins"][run] = {
            "max_weight_change": max_difference(single[run][0], initial),
            "weights": [w.tolist() for w in parallel[run][0]],
            "single_weights": [w.tolist() for w in single[run][0]],
            "parallel": parallel[run][1],
            "single": single[run][1],
        }
    report["poisoned_nonfinite_steps"] = bad[1]["nonfinite_steps"]
    report["poisoned_max_difference"] = max_difference(bad[0], clean[0])
    print(json.dumps(report))


def one_of_processes(folder, port, process):
    # Collectives between CPU processes (the default has none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(f"localhost:{port}", PROCESSES, process)
    initial = initial_weights()
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution.auto_shard_dataset = False  # each process feeds its own half
    keras.distribution.set_distribution(distribution)
    runs = {margin: train(margin, initial, process=process) for margin in DISTRIBUTION_MARGINS}
    runs["clean"] = poisoned(float32_initial_weights(), False, process)
    runs["poisoned"] = poisoned(float32_initial_weights(), True, process)
    save(os.path.join(folder, f"process{process}.json"), runs)


if __name__ == "__main__":
    if MULTI_PROCESS:
        one_of_processes(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    else:
        one_process(sys.argv[1])
