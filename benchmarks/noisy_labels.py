"""Noisy-label robustness: test accuracy against label-noise rate, per method.

Trains the `marginfit train` network (its defaults: the margin loss alone,
on the input and every hidden layer, Adam 1e-3 with a moving average of
the weights (momentum 0.99) that validation and the test set use, batch 64)
with plain cross-entropy, with the losses robust to label noise at their
authors' published settings (`marginfit.methods`: GCE, SCE, NCE+RCE,
CEeps+MAE, ANL-CE, LDR-KL), with the margin's defaults and with other margin settings, on
each dataset, label-noise rate and seed: every method with the same network,
optimizers, weight average, epochs, seeds and data. The network sees the noisy training
data less a 10 % validation split, whose accuracy is logged per epoch
against its noisy labels (what a user sees) and against its clean labels
(to spot stalls at chance, with the training weights and with the averaged
ones; nothing is chosen by it); the clean test set is
evaluated once, at the end; there is no early stopping.

Writes, into --output: ``runs.jsonl`` (one line per run; an interrupted
benchmark resumes where it stopped), ``noisy_labels.md`` (mean and min-max
test accuracy over seeds) and ``noisy_labels.png`` (accuracy against noise,
one line per method, min-max band), each naming the command.

    python benchmarks/noisy_labels.py [--data digits,digits28] \\
        [--noise 0,0.2,0.4,0.6,0.8] [--seeds 3] [--epochs 60] \\
        [--ema 0.99] \\
        [--methods cross-entropy,gce,sce,nce-rce,ce-eps-mae,anl-ce,ldr-kl,margin,top-1] \\
        [--output runs/noisy_labels] [--report-only]
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _results  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from marginfit import data  # noqa: E402
from marginfit import methods as methods_lib  # noqa: E402
from marginfit.experiments import Experiment  # noqa: E402

SAM_RHO = 0.05
"""SAM's radius: Foret et al.'s default (their noisy-label runs searched
rho; no MNIST setting is published)."""

# Method name -> (`marginfit.methods` name, changes to the `Experiment`).
METHODS = {
    **{name: (name, {}) for name in methods_lib.NAMES if name not in methods_lib.ADVERSARIAL},
    # The authors' loss: the top-scoring competitor(s), no class-balance term.
    "top-1": (methods_lib.MARGIN, {"competitors": "top", "balance": 0.0}),
    "all competitors": (
        methods_lib.MARGIN,
        {"competitors": "top", "top_k": 9, "aggregation": "sum", "balance": 0.0},
    ),
    # Sharpness-aware minimization (Foret et al. 2021) at the authors'
    # default radius, alone and with the margin.
    "sam": (methods_lib.CROSS_ENTROPY, {"sam": SAM_RHO}),
    "margin+sam": (methods_lib.MARGIN, {"sam": SAM_RHO}),
}
DEFAULT_METHODS = "cross-entropy,gce,sce,nce-rce,ce-eps-mae,anl-ce,ldr-kl,margin,top-1"


class CleanAccuracy(keras.callbacks.Callback):
    """Accuracy on examples with their clean labels after each epoch."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.values = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        predicted = np.argmax(self.model.predict(self.x, verbose=0), axis=-1)
        self.values.append(round(float(np.mean(predicted == self.y)), 4))


def run(dataset, noise, seed, method, epochs, ema):
    """One training run: its final test accuracy and validation curves."""
    kind, changes = METHODS[method]
    experiment = Experiment(
        data=dataset, label_noise=noise, seed=seed, epochs=epochs, ema=ema, **changes
    )
    (x_train, y_train), (x_test, y_test) = experiment.load()
    (_, clean_train), _ = experiment.replace(label_noise=0.0).load()
    # The split `marginfit train` makes (stratified by the noisy labels),
    # as indices, to find the validation examples' clean labels.
    (fit_rows, _), (validation_rows, _) = data.split(
        np.arange(len(y_train)), y_train, experiment.validation_split, seed
    )
    x_val = x_train[validation_rows]
    # Clean accuracy of the training weights (stalls show there) and, with
    # --ema, of the averaged weights that validation and the test set see.
    training = CleanAccuracy(x_val, clean_train[validation_rows])
    averaged = CleanAccuracy(x_val, clean_train[validation_rows])
    swap = experiment.weight_average_callbacks(on_epoch_end=True)
    classes = data.num_classes(y_train, y_test)
    model, _ = experiment.build(x_train.shape[1:], classes, kind, len(x_train))
    history = model.fit(
        x_train[fit_rows],
        y_train[fit_rows],
        epochs=epochs,
        batch_size=experiment.batch_size,
        validation_data=(x_val, y_train[validation_rows]),
        callbacks=[training, *swap, averaged] if swap else [training],
        verbose=0,
    )
    test = model.evaluate(x_test, y_test, batch_size=256, return_dict=True, verbose=0)
    return {
        "data": dataset,
        "noise": noise,
        "seed": seed,
        "method": method,
        "epochs": epochs,
        "ema": ema,
        "test_accuracy": test["accuracy"],
        "val_accuracy": [round(v, 4) for v in history.history["val_accuracy"]],
        "clean_val_accuracy": training.values,
        **({"clean_val_accuracy_averaged": averaged.values} if swap else {}),
    }


def spread(runs, dataset, noise, method):
    """``(mean, min, max, seeds)`` test accuracy over the seeds of one
    setting, and their number, or None if it has no run."""
    values = [
        r["test_accuracy"]
        for r in runs
        if (r["data"], r["noise"], r["method"]) == (dataset, noise, method)
    ]
    return (statistics.mean(values), min(values), max(values), len(values)) if values else None


STALL_AFTER = 5
"""Epochs after which the clean validation accuracy is watched for stalls."""


CURVES = {
    "clean_val_accuracy": "the training weights",
    "clean_val_accuracy_averaged": "the averaged weights (--ema), which lag the training "
    "weights by about 1 / (1 - momentum) steps",
}
"""Clean validation accuracy curves of a run: what each is taken with."""


def lowest_after_warm_up(runs, dataset, noise, method, curve="clean_val_accuracy"):
    """Lowest value of a clean validation accuracy ``curve`` (a key of
    `CURVES`) after epoch `STALL_AFTER` over the seeds of one setting, or
    None."""
    values = [
        min(r[curve][STALL_AFTER:])
        for r in runs
        if (r["data"], r["noise"], r["method"]) == (dataset, noise, method) and r.get(curve)
    ]
    return min(values) if values else None


def table(runs, datasets, noises, methods, command, seeds):
    header = ["| label noise | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    lines = [f"Produced by: `{command}`", ""]
    for dataset in datasets:
        lines += [f"### {dataset}: test accuracy, mean (min-max) over seeds", "", *header]
        for noise in noises:
            cells = []
            for method in methods:
                setting = spread(runs, dataset, noise, method)
                cell = "{:.4f} ({:.3f}-{:.3f})".format(*setting[:3]) if setting else ""
                if setting and setting[3] != seeds:  # an unfinished benchmark
                    cell += f" [{setting[3]} of {seeds} seeds]"
                cells.append(cell)
            lines.append(f"| {noise:.0%} | " + " | ".join(cells) + " |")
        for curve, weights in CURVES.items():
            if not any(r.get(curve) for r in runs if r["data"] == dataset):
                continue
            lines += [
                "",
                f"### {dataset}: lowest clean validation accuracy after epoch {STALL_AFTER}, "
                f"{weights} (any seed; chance is 1 / classes)",
                "",
                *header,
            ]
            for noise in noises:
                lowest = [lowest_after_warm_up(runs, dataset, noise, m, curve) for m in methods]
                cells = ["" if value is None else f"{value:.3f}" for value in lowest]
                lines.append(f"| {noise:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(runs, datasets, noises, methods, command, path):
    """Test accuracy against label noise per dataset, one line per method."""
    panels = {
        dataset: {
            method: [
                (noise, *setting[:3])
                for noise in noises
                if (setting := spread(runs, dataset, noise, method))
            ]
            for method in methods
        }
        for dataset in datasets
    }
    _results.accuracy_figure(panels, "label noise", command, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits,digits28")
    parser.add_argument("--noise", default="0,0.2,0.4,0.6,0.8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument(
        "--ema",
        type=float,
        default=Experiment().ema,
        help="the weight average's momentum, for every method (default: marginfit's)",
    )
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--output", default=os.path.join("runs", "noisy_labels"))
    _results.add_report_only(parser)
    args = parser.parse_args(argv)
    datasets = args.data.split(",")
    noises = [float(n) for n in args.noise.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    command = _results.command_line("noisy_labels.py", argv)
    log, runs = _results.load_runs(args.output)
    # Runs from before the weight average have no "ema": they had none.
    runs = [r for r in runs if (r["epochs"], r.get("ema", 0.0)) == (args.epochs, args.ema)]
    done = {(r["data"], r["noise"], r["seed"], r["method"]) for r in runs}
    for dataset in datasets:
        for noise in noises:
            for seed in range(args.seeds):
                for method in methods:
                    if (dataset, noise, seed, method) in done or args.report_only:
                        continue
                    result = run(dataset, noise, seed, method, args.epochs, args.ema)
                    runs.append(result)
                    _results.append_run(log, result)
                    print(
                        f"{dataset} noise {noise:.0%} seed {seed} {method}: "
                        f"test accuracy {result['test_accuracy']:.4f}",
                        flush=True,
                    )
    markdown = table(runs, datasets, noises, methods, command, args.seeds)
    with open(os.path.join(args.output, "noisy_labels.md"), "w") as file:
        file.write(markdown + "\n")
    figure(runs, datasets, noises, methods, command, os.path.join(args.output, "noisy_labels.png"))
    print("\n" + markdown)


if __name__ == "__main__":
    main()
