"""What the accuracy benchmarks (`noisy_labels.py`, `robustness.py`,
`distances.py`) share: a training run of `marginfit compare`'s network,
their log of runs, the command line their reports name, and the figure of
accuracy against a setting, one panel per dataset."""

import json
import os
import shlex
import time
import warnings

from marginfit import data
from marginfit.callbacks import CatastrophicOverfitting, CatastrophicOverfittingWarning

REPORT_ONLY = "--report-only"


def train(experiment, method, validation=False, watch_eps=None, with_margin=False):
    """One training run of ``method`` (a name of `marginfit.methods.NAMES`)
    with ``experiment``'s network, optimizers and weight average (a
    `marginfit.experiments.Experiment`; with ``with_margin``, its margin
    added to the method's penalty) on every training example, with clean
    labels: ``(model, margin, seconds, (x_test, y_test), collapsed)``,
    ``margin`` the experiment's `LargeMargin` (also for other methods).

    With ``validation``, the model trains on the training data less the
    experiment's validation split, and that split takes the test set's
    place (to choose settings without the test set). With ``watch_eps``, a
    `marginfit.CatastrophicOverfitting` at that eps watches the first 256
    training examples and stops a collapse (Wong et al.'s early stopping,
    stricter: see the callback);
    ``collapsed`` is the 0-based epoch it saw one (else None), and
    ``seconds`` leave out the time its attacks take."""
    (x_train, y_train), test = experiment.replace(label_noise=0.0).load()
    if validation:
        (x_train, y_train), test = data.split(
            x_train, y_train, experiment.validation_split, experiment.seed
        )
    model, margin = experiment.build(
        x_train.shape[1:], 10, method, len(x_train), with_margin=with_margin
    )
    callbacks = experiment.weight_average_callbacks()
    watch = None
    if watch_eps is not None:
        watch = CatastrophicOverfitting(x_train[:256], y_train[:256], watch_eps)
        callbacks.append(watch)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatastrophicOverfittingWarning)  # recorded instead
        model.fit(
            x_train,
            y_train,
            epochs=experiment.epochs,
            batch_size=experiment.batch_size,
            verbose=0,
            callbacks=callbacks,
        )
    seconds = time.perf_counter() - started - (watch.seconds if watch else 0.0)
    return model, margin, seconds, test, watch.collapsed_epoch if watch else None


def add_report_only(parser):
    """Adds `REPORT_ONLY` to an `argparse` parser."""
    parser.add_argument(
        REPORT_ONLY,
        action="store_true",
        help="write the table and figure from the runs logged so far; train nothing",
    )


def command_line(script, argv):
    """The command that produces a report: ``script`` and ``argv``, less
    `REPORT_ONLY` (which only rewrites it)."""
    argv = [a for a in argv if a != REPORT_ONLY]
    return f"python benchmarks/{script} " + " ".join(map(shlex.quote, argv))


def load_runs(output):
    """``(log, runs)``: the path of ``output``'s ``runs.jsonl`` (made if
    needed) and the runs logged there, one dict per line."""
    os.makedirs(output, exist_ok=True)
    log = os.path.join(output, "runs.jsonl")
    if not os.path.exists(log):
        return log, []
    with open(log) as file:
        return log, [json.loads(line) for line in file if line.strip()]


def append_run(log, result):
    """Appends one run to the log, so that an interrupted benchmark resumes."""
    with open(log, "a") as file:
        file.write(json.dumps(result) + "\n")


def accuracy_figure(panels, xlabel, command, path):
    """One panel per dataset of test accuracy against a setting: a line of
    means and a min-max band per series.

    Args:
        panels: ``{dataset: {label: [(x, mean, low, high), ...]}}``; series
            without points are left out.
        xlabel: The setting's name, under every panel.
        command: The command that produced the figure, printed under it.
        path: Where the PNG goes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (dataset, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            if points:
                x, mean, low, high = zip(*points)
                axis.plot(x, mean, "-o", label=label)
                axis.fill_between(x, low, high, alpha=0.2)
        axis.set(xlabel=xlabel, ylabel="test accuracy", title=dataset, ylim=(0, 1))
        axis.legend()
    fig.text(0.01, 0.01, f"produced by: {command}", fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
