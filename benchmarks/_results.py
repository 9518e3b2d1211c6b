"""What the accuracy benchmarks (`noisy_labels.py`, `robustness.py`,
`distances.py`) share: a training run of `marginfit compare`'s network,
their log of runs, the command line their reports name, and the figure of
accuracy against a setting, one panel per dataset."""

import json
import os
import shlex
import time

REPORT_ONLY = "--report-only"


def train(experiment, method):
    """One training run of ``method`` (a name of `marginfit.methods.NAMES`)
    with ``experiment``'s network, optimizers and weight average (a
    `marginfit.experiments.Experiment`) on every training example, with
    clean labels: ``(model, margin, seconds, (x_test, y_test))``, ``margin``
    the experiment's `LargeMargin` (also for other methods)."""
    (x_train, y_train), test = experiment.replace(label_noise=0.0).load()
    model, margin = experiment.build(x_train.shape[1:], 10, method, len(x_train))
    started = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        epochs=experiment.epochs,
        batch_size=experiment.batch_size,
        verbose=0,
        callbacks=experiment.weight_average_callbacks(),
    )
    return model, margin, time.perf_counter() - started, test


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
