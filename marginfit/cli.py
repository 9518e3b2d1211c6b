"""The `marginfit` command: `marginfit train` and `marginfit compare`.

    marginfit train                 # a small CNN with the margin on the bundled digits
    marginfit train --data mnist --label-noise 0.4 --epochs 60
    marginfit compare --noise-levels 0.2,0.4 --eps 0.05,0.1,0.2

`train` fits one model and writes model.keras, history.csv and summary.json
into --output; `compare` fits the same network with plain cross-entropy and
with the margin and writes report.md with its table and PNG figures.
"""

import argparse
import json
import os
import shlex
import sys
import time

import keras

from marginfit import cluster, files, methods
from marginfit import data as data_lib
from marginfit import logs as logs_lib
from marginfit.experiments import PRESETS, Experiment, floats
from marginfit.model import MarginModel

PRESET_HELP = (
    "named settings: 'authors' = the authors' MNIST configuration (RMSProp 0.1, "
    "batch norm, L2, inf norm with layer sizes as weights, top-scoring competitor, "
    "5x5 convs, dense 512, batch 256, 200 epochs); 'robust' = the margin for L-inf "
    "robustness (on the input, logit space, gamma 0.3 pixels, exact gradients, beside "
    "the cross-entropy at weight 0.1); flags given as well override it"
)


def _methods(text):
    try:
        return methods.check([name for name in text.split(",") if name])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser():
    """The argument parser of the `marginfit` command: one flag per field of
    `Experiment` (absent where not given), and each command's own."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", choices=sorted(PRESETS), help=PRESET_HELP)
    groups = {}
    for group, field in Experiment.flags():
        if group not in groups:
            groups[group] = common.add_argument_group(group)
        flag, parse = "--" + field.name.replace("_", "-"), field.metadata["parse"]
        options = dict(dest=field.name, default=argparse.SUPPRESS, help=field.metadata["help"])
        if parse is bool:
            groups[group].add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            groups[group].add_argument(flag, type=parse, **options)
    common.add_argument("--output", help="output directory (default runs/<command>)")

    top = argparse.ArgumentParser(
        prog="marginfit",
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train",
        parents=[common],
        help="train one model with the margin",
        description="Train a small network with the large-margin loss.",
    )
    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="cross-entropy vs margin: report with table and plots",
        description="Train the same network with cross-entropy and with the margin, then write "
        "report.md with accuracy under label noise and FGSM/PGD, and PNG figures.",
    )
    compare.add_argument(
        "--methods",
        type=_methods,
        default=[methods.CROSS_ENTROPY, methods.MARGIN],
        help=f"comma-separated methods: {', '.join(methods.NAMES)} (default "
        "cross-entropy,margin); each peer at its authors' published settings "
        "(marginfit.methods)",
    )
    compare.add_argument(
        "--noise-levels",
        type=floats,
        default=[0.4],
        help="label-noise rates to compare at (default 0.4)",
    )
    compare.add_argument(
        "--eps",
        type=floats,
        default=[0.05, 0.1, 0.2],
        help="L-inf radii of the FGSM/PGD evaluation, input units (default 0.05,0.1,0.2)",
    )
    return top


def parse_args(argv):
    """``argv`` parsed: the command's options, with ``experiment``, the
    `Experiment` of ``--preset`` (or the defaults) and the flags given."""
    args = parser().parse_args(argv)
    names = {field.name for _, field in Experiment.flags()}
    given = {name: vars(args).pop(name) for name in names if name in vars(args)}
    base = Experiment.preset(args.preset) if args.preset else Experiment()
    args.experiment = base.replace(**given)
    return args


def fit(experiment, model, data, output, verbose=1):
    """Fits on the training data less a validation split (the logs' ``val_``
    metrics, for callbacks); the test set is evaluated once, at the end."""
    (x_train, y_train), (x_test, y_test) = data
    (x_fit, y_fit), validation = data_lib.split(
        x_train, y_train, experiment.validation_split, experiment.seed
    )
    started = time.perf_counter()
    # The log grows per epoch under a temporary name; it replaces
    # history.csv once training has finished.
    with files.atomic_path(os.path.join(output, "history.csv")) as log:
        history = model.fit(
            x_fit,
            y_fit,
            epochs=experiment.epochs,
            batch_size=experiment.batch_size,
            validation_data=validation,
            verbose=verbose,
            callbacks=[*experiment.weight_average_callbacks(), keras.callbacks.CSVLogger(log)],
        )
    logs = model.evaluate(x_test, y_test, batch_size=256, return_dict=True, verbose=0)
    logs["seconds"] = time.perf_counter() - started
    return history.history, logs


def _command_line(argv):
    return "marginfit " + " ".join(shlex.quote(a) for a in argv)


# ----------------------------------------------------------------- commands


def train(args, argv):
    """Writes model.keras, history.csv and summary.json into the output
    directory, each atomically (`marginfit.files`), while holding the
    directory against other writers.

    Where ``TF_CONFIG`` names a cluster, every worker runs this: the model
    trains under `tf.distribute.MultiWorkerMirroredStrategy` (``--batch-size``
    is the global batch, split over the workers), and only the chief writes
    the outputs (`marginfit.cluster`).
    """
    strategy = cluster.strategy()
    output = args.output or os.path.join("runs", "train")
    with cluster.output_directory(output, "marginfit train") as directory:
        return _train(args, argv, directory, strategy)


def _train(args, argv, output, strategy):
    experiment = args.experiment
    data = experiment.load()
    with strategy.scope():
        (x_train, y_train), (_, y_test) = data
        classes = data_lib.num_classes(y_train, y_test)
        model, _ = experiment.build(x_train.shape[1:], classes, num_examples=len(x_train))
    _, logs = fit(experiment, model, data, output)
    with files.atomic_path(os.path.join(output, "model.keras")) as temporary:
        model.save(temporary)
    summary = {"command": _command_line(argv), "test": {k: float(v) for k, v in logs.items()}}
    files.write_text(os.path.join(output, "summary.json"), json.dumps(summary, indent=2))
    print("\n  test metric            value")
    for name, value in sorted(logs_lib.shown(model, logs).items()):
        print(f"  {name:<20} {value:>8.4f}")
    where = output if cluster.is_chief() else "the chief's output directory"
    print(f"\ntest accuracy {logs['accuracy']:.4f}; model, history and summary in {where}")
    return summary


def compare(args, argv):
    """Writes report.md, results.json, the figures and history.csv into the
    output directory, each atomically, holding it against other writers."""
    output = args.output or os.path.join("runs", "compare")
    with files.exclusive(output, "marginfit compare"):
        return _compare(args, argv, output)


def _compare(args, argv, output):
    from marginfit import report  # matplotlib only here

    results = {
        "command": _command_line(argv),
        "methods": args.methods,
        "noise": {},
        "attacks": {},
        "seconds": {},
        "curves": {},
        "distances": {},
        "measured": {},
    }
    for noise in [0.0, *args.noise_levels]:
        experiment = args.experiment.replace(label_noise=noise)
        data = experiment.load()
        shape, classes = data[0][0].shape[1:], data_lib.num_classes(data[0][1], data[1][1])
        row = {}
        for name in args.methods:
            print(f"\n== {name}, label noise {noise:.0%} ==")
            model, margin = experiment.build(shape, classes, name, len(data[0][0]))
            history, logs = fit(experiment, model, data, output, verbose=2)
            row[name] = logs["accuracy"]
            if noise == 0.0:
                x_test, y_test = data[1]
                results["attacks"][name] = report.robustness(model, x_test, y_test, args.eps)
                results["seconds"][name] = logs["seconds"]
                results["curves"][name] = history
                results["distances"][name] = MarginModel.wrap(model, margin).margin_distances(
                    x_test, y_test
                )
                results["measured"][name] = report.measured_distances(
                    model, x_test, y_test, margin.norm
                )
        results["noise"][f"{noise:g}"] = row
    path = report.write(results, output, args.eps)
    print(f"\nreport in {path}")
    return results


def run(argv):
    """Runs the command line ``argv``; returns its results."""
    args = parse_args(argv)
    return {"train": train, "compare": compare}[args.command](args, argv)


def main(argv=None):
    """Entry point of the console script; returns the exit status. Bad
    settings (an unknown layer, unreadable data, no network) end with one
    line naming the problem instead of a traceback."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"marginfit: {error}") from error
    return 0


if __name__ == "__main__":
    sys.exit(main())
