"""The search command: ``marginfit-tune`` (or ``python -m marginfit.tuning``).

    marginfit-tune --tuner random --trials 10 --epochs 5 \\
        --objective val_accuracy --output tuning_results \\
        --set gamma=1:10000 --set norm=2,inf --set conv_layers=1

Prints keras-tuner's progress and a results table; writes
``results.csv``/``results.json`` (one row per finished trial, best first),
``best.keras`` (the best trial's model, reloadable with
`keras.models.load_model`) and ``best.json`` (its hyperparameters and
validation metrics) into the output directory.

With keras-tuner's variables set (see `marginfit.tuning.distributed`), one
process is the chief, which hands out the trials and writes the results, and
the others are workers, which run the trials:

    KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=127.0.0.1 \
        KERASTUNER_ORACLE_PORT=8000 marginfit-tune --trials 20 &
    KERASTUNER_TUNER_ID=tuner0 KERASTUNER_ORACLE_IP=127.0.0.1 \
        KERASTUNER_ORACLE_PORT=8000 marginfit-tune --trials 20 &
"""

import argparse
import json
import os
import sys

import numpy as np

import marginfit
from marginfit import files
from marginfit.tuning import distributed, search
from marginfit.tuning.hypermodel import MarginHyperModel


def parse_setting(text):
    """``name=value`` (fixed), ``name=low:high`` (range) or ``name=a,b,c``
    (choice) as ``(name, value)`` in `MarginHyperModel`'s conventions."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(
            f"--set expects name=value, name=low:high or name=a,b,c; received {text!r}."
        )
    if ":" in value:
        low, high = value.split(":")
        return name, (_number(low), _number(high))
    if "," in value:
        return name, [_number(part) for part in value.split(",")]
    return name, _number(value)


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, received {text}")
    return value


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv=None):
    """Entry point of the console script; returns the exit status. Bad
    settings (an unknown hyperparameter, a bad range, unreadable data) end
    with one line naming the problem instead of a traceback."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"marginfit-tune: {error}") from error
    return 0


def run(argv=None):
    """Runs the search command line ``argv``; returns the best trial's summary."""
    parser = argparse.ArgumentParser(
        prog="marginfit-tune",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--data",
        default="digits",
        help="'digits' (bundled), a .npz file with x and y arrays (or x_train, y_train, "
        "x_test, y_test), or mnist/fashion_mnist/cifar10 (needs network)",
    )
    parser.add_argument("--tuner", default="random", choices=search.TUNERS)
    parser.add_argument(
        "--trials", type=_positive, default=10, help="trials of random/bayesian search"
    )
    parser.add_argument(
        "--epochs", type=_positive, default=5, help="epochs per trial (Hyperband: its max_epochs)"
    )
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument(
        "--objective",
        default="val_accuracy",
        help="a log name, e.g. val_margin_loss; 'name:min|max' for others",
    )
    parser.add_argument(
        "--output", default="tuning_results", help="directory of the search and its results"
    )
    parser.add_argument(
        "--set",
        dest="settings",
        type=parse_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="narrow or fix a hyperparameter (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    parser.add_argument(
        "--worker-timeout",
        type=_positive,
        default=60,
        help="distributed search: seconds of silence after which the chief hands a worker's "
        f"trial to another worker (a worker training a trial calls every "
        f"{distributed.HEARTBEAT_SECONDS:g} s; default 60)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_val, y_val) = marginfit.data.load(args.data, args.seed)
    hypermodel = MarginHyperModel(
        input_shape=x_train.shape[1:],
        num_classes=marginfit.data.num_classes(y_train, y_val),
    )
    tuner = search.make_tuner(
        args.tuner,
        hypermodel,
        args.objective,
        args.output,
        max_trials=args.trials,
        epochs=args.epochs,
        overwrite=args.overwrite,
        seed=args.seed,
        hyperparameters=search.hyperparameters(hypermodel, dict(args.settings)),
    )
    if distributed.role() == "chief":
        distributed.watch_workers(tuner.oracle, args.worker_timeout)
    tuner.search(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        batch_size=args.batch_size,
        verbose=1,
    )
    if distributed.role() == "worker":
        print("marginfit-tune: no trial left; the chief writes the results.")
        return None
    rows = search.results(tuner)
    print("\n" + search.format_table(rows, tuner.oracle.objective.name))
    search.write_results(rows, args.output)
    if not rows:
        raise SystemExit("No trial finished; see keras-tuner's messages above.")

    best = search.best_model(tuner)
    with files.atomic_path(os.path.join(args.output, "best.keras")) as temporary:
        best.save(temporary)
    validation = best.evaluate(
        x_val, y_val, batch_size=args.batch_size, return_dict=True, verbose=0
    )
    summary = {
        "trial": rows[0]["trial"],
        "objective": tuner.oracle.objective.name,
        "score": rows[0]["score"],
        "hyperparameters": tuner.get_best_hyperparameters(1)[0].values,
        "validation": {k: float(np.asarray(v)) for k, v in validation.items()},
    }
    files.write_text(os.path.join(args.output, "best.json"), json.dumps(summary, indent=2))
    print(
        f"\nbest trial {summary['trial']}: {summary['objective']} = {summary['score']:.4f}; "
        f"model in {os.path.join(args.output, 'best.keras')}"
    )
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
