"""Large-margin training on several workers, in plain fit(): TensorFlow's
MultiWorkerMirroredStrategy from TF_CONFIG, and a backup that survives a
killed worker.

Start a cluster of 2 workers on this host (the script starts both):

    python examples/multi_worker.py --local-workers 2

or run one process per worker, each with its own TF_CONFIG (index 0 is the
chief, which writes the outputs), e.g. on two hosts:

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' python examples/multi_worker.py
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def local_cluster(workers, argv):
    """Runs this script with ``argv`` as ``workers`` processes on localhost,
    one per worker of a cluster; waits for all of them."""
    from marginfit import cluster

    ports = cluster.free_ports(workers)
    processes = []
    try:
        for index in range(workers):
            environment = {**os.environ, "TF_CONFIG": cluster.local_tf_config(ports, index)}
            processes.append(subprocess.Popen([sys.executable, __file__, *argv], env=environment))
        codes = [process.wait() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if any(codes):
        raise RuntimeError(f"a worker failed (exit codes {codes})")


def train(args):
    """One worker's part: every worker runs the same code."""
    from marginfit import cluster

    strategy = cluster.strategy()  # before anything else uses TensorFlow

    import keras

    import marginfit
    from marginfit import files

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = marginfit.load_digits()
    with strategy.scope():
        network = marginfit.networks.classifier(x_train.shape[1:], 10)
        margin = marginfit.LargeMargin(marginfit.networks.margin_layers(network))
        model = marginfit.networks.margin_classifier(network, margin)
    with cluster.output_directory(args.output, "examples/multi_worker.py") as output:
        history = model.fit(
            x_train,
            y_train,
            batch_size=args.batch_size,  # the global batch, split over the workers
            epochs=args.epochs,
            callbacks=[
                # Only the chief writes it; a restarted cluster resumes from it.
                marginfit.BackupAndRestore(os.path.join(args.output, "backup"), save_freq=10)
            ],
            verbose=2 if cluster.is_chief() else 0,
        )
        logs = model.evaluate(x_test, y_test, return_dict=True, verbose=0)
        results = {
            "workers": strategy.num_replicas_in_sync,
            "test": {name: float(value) for name, value in logs.items()},
            "epochs": len(history.history["loss"]),
        }
        with files.atomic_path(os.path.join(output, "model.keras")) as temporary:
            model.save(temporary)
        files.write_text(os.path.join(output, "results.json"), json.dumps(results))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join("runs", "multi_worker"))
    args = parser.parse_args(argv)
    if args.local_workers:
        worker_argv = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        worker_argv += ["--seed", str(args.seed), "--output", args.output]
        local_cluster(args.local_workers, worker_argv)
        with open(os.path.join(args.output, "results.json")) as file:
            return json.load(file)
    return train(args)


if __name__ == "__main__":
    print(main())
