"""Multi-worker throughput of MarginModel on localhost: steps per second
with 1 and 2 workers, the margin / cross-entropy step ratio on each, and the
cost of the default margin's per-step all-reduce.

Each configuration starts its worker processes (2 workers: a localhost
cluster under MultiWorkerMirroredStrategy from TF_CONFIG, one CPU replica
each) and trains, on the same global batches of 64, the anchor CNN of
`benchmarks/step_time.py` three ways: plain cross-entropy
(`MarginModel(margin=None)`), the default margin, and the default margin
without its all-reduce of the global batch's statistics (the class-balance
sums and the competitors' positions, `marginfit.backend.tensorflow.replicas`; patched out, so
each replica takes them over its own share, as before that all-reduce
existed). The three are interleaved: one epoch of each in turn, so that
they see the same machine load; each epoch is timed from the end of its
first step. Prints a table and a JSON line of medians over the epochs after
the first (a warm-up).

    python benchmarks/multi_worker.py [--steps 20] [--epochs 4] [--workers 1,2]

On one host the workers share its cores and memory bandwidth; the ratios,
measured side by side, are what carries over to several hosts. With one
worker there is nothing to all-reduce, so the last two models are the same.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 64
MODELS = ("ce", "margin", "margin_local")
"""Cross-entropy, the default margin, and the default margin with
per-replica statistics (no all-reduce)."""


def worker(steps, epochs):
    """One worker's part: prints ``{model: median s/step}`` (the chief)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from marginfit import cluster

    strategy = cluster.strategy()

    import keras
    import numpy as np

    sys.path.insert(0, HERE)
    import step_time

    import marginfit
    from marginfit.backend.tensorflow import replicas

    class Clock(keras.callbacks.Callback):
        """Seconds per step of an epoch, from the end of its first step."""

        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append((time.perf_counter() - self.started) / (steps - 1))

    rng = np.random.default_rng(0)
    x = rng.random((steps * BATCH, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, len(x))
    models, clocks = {}, {}
    for name in MODELS:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            network, layers = step_time.cnn()
            margin = None if name == "ce" else marginfit.LargeMargin(layers)
            model = marginfit.MarginModel(network.inputs, network.logits, margin=margin)
            model.compile(
                keras.optimizers.SGD(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        models[name] = model
        clocks[name] = Clock()
        clocks[name].seconds = []
    local = mock.patch.object(replicas, "_replica_context", lambda: None)
    for _ in range(epochs):
        for name, model in models.items():
            # The patch acts when the step is traced (its first epoch).
            with local if name == "margin_local" else contextlib.nullcontext():
                model.fit(
                    x,
                    y,
                    batch_size=BATCH,
                    epochs=1,
                    shuffle=False,
                    verbose=0,
                    callbacks=[clocks[name]],
                )
    seconds = {name: statistics.median(clock.seconds[1:]) for name, clock in clocks.items()}
    if cluster.is_chief():
        print(json.dumps(seconds), flush=True)


def measure(workers, steps, epochs):
    """Median seconds per step of each of `MODELS` with ``workers``
    processes."""
    from marginfit.cluster import free_ports, local_tf_config

    ports = free_ports(workers)
    processes = []
    try:
        for index in range(workers):
            environment = dict(os.environ)
            if workers > 1:
                environment["TF_CONFIG"] = local_tf_config(ports, index)
            command = [__file__, "--worker", "--steps", str(steps), "--epochs", str(epochs)]
            processes.append(
                subprocess.Popen(
                    [sys.executable, *command],
                    env=environment,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        outputs = [process.communicate(timeout=3600)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if any(process.returncode for process in processes):
        raise RuntimeError(f"a worker failed: {[p.returncode for p in processes]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs (the first warms up)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.steps, args.epochs)
    report = {"global_batch": BATCH, "workers": {}}
    print(
        f"{'workers':>7} {'CE steps/s':>11} {'margin steps/s':>15} {'margin/CE':>10} "
        f"{'all-reduce cost':>16}"
    )
    for count in map(int, args.workers.split(",")):
        seconds = measure(count, args.steps, args.epochs)
        row = {
            "ce_steps_per_second": round(1 / seconds["ce"], 3),
            "margin_steps_per_second": round(1 / seconds["margin"], 3),
            "margin_to_ce": round(seconds["margin"] / seconds["ce"], 3),
            # The default margin's step over the same step without the
            # all-reduce of the global batch's statistics.
            "allreduce_cost": round(seconds["margin"] / seconds["margin_local"], 3),
        }
        report["workers"][count] = row
        print(
            f"{count:>7} {row['ce_steps_per_second']:>11.2f} "
            f"{row['margin_steps_per_second']:>15.2f} {row['margin_to_ce']:>10.2f} "
            f"{row['allreduce_cost']:>16.3f}",
            flush=True,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
