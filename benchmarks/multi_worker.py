"""Multi-worker throughput of MarginModel on localhost: steps per second
with 1 and 2 workers, and the margin / cross-entropy step ratio on each.

Each configuration starts its worker processes (2 workers: a localhost
cluster under MultiWorkerMirroredStrategy from TF_CONFIG, one CPU replica
each), trains the anchor CNN of `benchmarks/step_time.py` with plain
cross-entropy (`MarginModel(margin=None)`) and with the default margin, one
after the other in the same processes, on the same global batches of 64,
and times the steps after a warm-up epoch. Prints a table and a JSON line.

    python benchmarks/multi_worker.py [--steps 20] [--epochs 3] [--workers 1,2]

On one host the workers share its cores and memory bandwidth; the ratios,
measured side by side, are what carries over to several hosts.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 64


def worker(steps, epochs):
    """One worker's part: prints ``{"ce": s/step, "margin": s/step}``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from marginfit import cluster

    strategy = cluster.strategy()

    import keras
    import numpy as np

    sys.path.insert(0, HERE)
    import step_time

    import marginfit

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    rng = np.random.default_rng(0)
    x = rng.random((steps * BATCH, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, len(x))
    seconds = {}
    for name, with_margin in (("ce", False), ("margin", True)):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            network, layers = step_time.cnn()
            margin = marginfit.LargeMargin(layers) if with_margin else None
            model = marginfit.MarginModel(network.inputs, network.logits, margin=margin)
            model.compile(
                keras.optimizers.SGD(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        clock = Clock()
        clock.seconds = []
        model.fit(
            x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[clock]
        )
        seconds[name] = min(clock.seconds[1:]) / steps  # after the warm-up epoch
    if cluster.is_chief():
        print(json.dumps(seconds), flush=True)


def measure(workers, steps, epochs):
    """Seconds per step of CE and margin with ``workers`` processes."""
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
    parser.add_argument("--epochs", type=int, default=3, help="epochs (the first warms up)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.steps, args.epochs)
    report = {"global_batch": BATCH, "workers": {}}
    print(f"{'workers':>7} {'CE steps/s':>11} {'margin steps/s':>15} {'margin/CE':>10}")
    for count in map(int, args.workers.split(",")):
        seconds = measure(count, args.steps, args.epochs)
        row = {
            "ce_steps_per_second": round(1 / seconds["ce"], 3),
            "margin_steps_per_second": round(1 / seconds["margin"], 3),
            "margin_to_ce": round(seconds["margin"] / seconds["ce"], 3),
        }
        report["workers"][count] = row
        print(
            f"{count:>7} {row['ce_steps_per_second']:>11.2f} "
            f"{row['margin_steps_per_second']:>15.2f} {row['margin_to_ce']:>10.2f}",
            flush=True,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
