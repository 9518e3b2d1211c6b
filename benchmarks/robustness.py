"""Adversarial robustness: cross-entropy, three adversarial trainings and
the robust margin side by side, under attacks that are hard to fool.

Trains the `marginfit train` network, per dataset and seed, with the same
optimizers, weight average, epochs and data: plain cross-entropy; PGD
adversarial training (Madry et al. 2018: 40 steps of 2.5 eps / 40 from a
random start); fast adversarial training (Wong et al. 2020: FGSM from a
random start, step 1.25 eps, watched by `marginfit.CatastrophicOverfitting`
on 256 training examples, which stops a collapse with the best epoch's
weights, a stricter form of the authors' early stopping); TRADES (Zhang et
al. 2019: beta 1, 40 steps of eps / 30); the margin of ``marginfit train --preset robust``
(one model for every eps); and that margin trained on fast adversarial
training's examples (``robust margin + fgsm``); that margin with the
input-gradient penalty, and TRADES with it (``marginfit.Penalties``). The
adversarial trainings
train one model per eps, at the eps they are evaluated at. The clean test
set (or, with ``--validation``, a validation split of the training data,
to choose settings) is then attacked, per model and eps, by

- white-box PGD: 50 steps of 2.5 eps / 50 from 5 random starts, on the
  cross-entropy and on the Carlini-Wagner margin (which a confident softmax
  cannot flatten), an example counting as robust only if every start of
  both fails;
- a transfer attack: the same PGD on the cross-entropy model of the seed,
  its examples fed to the model (no gradient of the model is used, so
  masked gradients cannot help it).

The accuracy reported is under the stronger of the two; a transfer attack
that beats the white-box one flags gradient masking. Each model is also
attacked at eps 0.5, where the digits are no longer recognisable and every
honest attack must reach (near) 0. Training seconds (less the watch's
attacks) are measured one run after another in one process, and reported
also as a ratio to those of the seed's cross-entropy model, trained just
before in the same process.

Writes, into --output: ``runs.jsonl`` (one line per model; an interrupted
benchmark resumes where it stopped, a model evaluated at fewer eps than
asked is trained again, and a model's last line counts), ``robustness.md``
(mean and min-max over seeds) and ``robustness.png``, each naming the
command.

    python benchmarks/robustness.py [--data digits,digits28] [--eps 0.05,0.1,0.2]
        [--seeds 3] [--epochs 60] [--models pgd-at,fgsm-at,trades,...]
        [--validation] [--output runs/robustness] [--report-only]
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _results  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from marginfit import attacks  # noqa: E402
from marginfit.experiments import Experiment  # noqa: E402

COMBINED = "robust margin + fgsm"
"""The robust margin trained on fast adversarial training's examples."""

WITH_INPUT_GRADIENT = "robust margin + input gradient"
"""The robust margin with the input-gradient penalty (`marginfit.Penalties`)."""
TRADES_MARGIN = "trades + robust margin"
"""TRADES with the robust margin (`marginfit.Penalties`)."""
INPUT_GRADIENT_WEIGHT = 0.1
"""The input-gradient penalty's weight beside the margin. No published MNIST
setting; chosen with --validation (digits, seed 0, PGD at eps 0.1 on the
validation split, the test set unseen): weights 10, 1, 0.1, 0.03, 0.01 gave
0.793, 0.807, 0.874, 0.859, 0.867 (the robust margin alone 0.837, fast
adversarial training 0.911; clean 0.970, 0.970, 0.985, 0.985, 0.985)."""
MODELS = (
    *("cross-entropy", "pgd-at", "fgsm-at", "trades", "robust margin", COMBINED),
    *(WITH_INPUT_GRADIENT, TRADES_MARGIN),
)
PER_EPS = ("pgd-at", "fgsm-at", "trades", COMBINED, TRADES_MARGIN)
"""The models trained at the eps they are evaluated at (one per eps)."""
WATCHED = ("fgsm-at", COMBINED)
"""The models trained on FGSM examples, watched for catastrophic
overfitting (`marginfit.CatastrophicOverfitting`, which stops it)."""
SANITY_EPS = 0.5
"""An eps at which every honest attack leaves (near) no digit recognised."""
WHITE_BOX = {"steps": 50, "restarts": 5}
LOSSES = attacks.LOSSES
"""What the attacks maximise: both the cross-entropy and the CW margin."""


def experiment_of(dataset, seed, model_name, epochs, eps=None):
    """``(experiment, method)`` of one model kind."""
    experiment, method = Experiment(data=dataset, seed=seed, epochs=epochs), model_name
    if model_name in ("robust margin", COMBINED, WITH_INPUT_GRADIENT, TRADES_MARGIN):
        experiment, method = (
            Experiment.preset("robust", data=dataset, seed=seed, epochs=epochs),
            "trades" if model_name == TRADES_MARGIN else "margin",
        )
    if model_name == COMBINED:
        experiment = experiment.replace(adversary="fgsm")
    if model_name == WITH_INPUT_GRADIENT:
        experiment = experiment.replace(input_gradient=INPUT_GRADIENT_WEIGHT)
    if model_name in PER_EPS:
        experiment = experiment.replace(pgd_eps=eps)
    return experiment, method


def train(dataset, seed, model_name, epochs, eps=None, validation=False):
    """``(model, seconds, (x_test, y_test), collapsed)`` of one training
    run (the validation split in the test set's place with ``validation``)."""
    experiment, method = experiment_of(dataset, seed, model_name, epochs, eps)
    watch_eps = eps if model_name in WATCHED else None
    model, _, seconds, test, collapsed = _results.train(
        experiment, method, validation, watch_eps, with_margin=model_name == TRADES_MARGIN
    )
    return model, seconds, test, collapsed


def white_box(model, x, y, eps):
    """Accuracy under PGD on both losses (`WHITE_BOX`); robust only if every
    start of both fails."""
    return attacks.adversarial_accuracy(
        model, x, y, eps, "pgd", batch_size=len(x), loss=LOSSES, **WHITE_BOX
    )


def transfer(model, source, x, y, eps):
    """Accuracy of ``model`` on PGD examples of ``source`` (both losses)."""
    robust = np.ones(len(x), bool)
    for loss in LOSSES:
        attack = tf.function(
            lambda x, y, loss=loss: attacks.pgd(
                source, x, y, eps, steps=WHITE_BOX["steps"], loss=loss
            )
        )
        adversarial = attack(tf.constant(x, tf.float32), tf.constant(y))
        robust &= np.argmax(model.predict(adversarial, verbose=0), -1) == y
    return float(robust.mean())


def evaluate(model, source, x, y, eps_list):
    """Clean accuracy, and per eps the white-box, transfer and reported
    (the lower) accuracies."""
    clean = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    result = {"clean": clean, "white_box": {}, "transfer": {}, "accuracy": {}}
    for eps in eps_list:
        white = white_box(model, x, y, eps)
        moved = transfer(model, source, x, y, eps) if source is not model else white
        result["white_box"][f"{eps:g}"] = white
        result["transfer"][f"{eps:g}"] = moved
        result["accuracy"][f"{eps:g}"] = min(white, moved)
    return result


def plan(models, eps_list):
    """``[(model kind, training eps or None)]`` of one dataset and seed."""
    return [(name, eps) for name in models for eps in (eps_list if name in PER_EPS else [None])]


def key_of(run):
    """``(data, seed, model kind, training eps)``: one model of the log."""
    return run["data"], run["seed"], run["model"], run["train_eps"]


def latest(runs):
    """The last logged run of each model (a rerun supersedes a run)."""
    return list({key_of(r): r for r in runs}.values())


def finished(runs, eps_list):
    """Keys of the runs evaluated at every eps they are meant for: their
    training eps, or (one model for every eps) each of ``eps_list``."""

    def meant_for(run):
        return eps_list if run["train_eps"] is None else [run["train_eps"]]

    return {key_of(r) for r in runs if all(f"{e:g}" in r["accuracy"] for e in meant_for(r))}


def run_seed(dataset, seed, eps_list, epochs, done, log, models=MODELS, validation=False):
    """Trains and evaluates every model of ``models`` of one dataset and
    seed that ``done`` lacks; appends each result to ``log``."""
    reference, seconds, (x, y), _ = train(
        dataset, seed, "cross-entropy", epochs, validation=validation
    )
    results = []
    for name, eps in plan(["cross-entropy", *models], eps_list):
        key = (dataset, seed, name, eps)
        if key in done:
            continue
        collapsed = None
        if name == "cross-entropy":
            model, trained = reference, seconds
        else:
            model, trained, _, collapsed = train(dataset, seed, name, epochs, eps, validation)
        evaluated = [eps] if eps is not None else list(eps_list)
        result = {
            "data": dataset,
            "seed": seed,
            "model": name,
            "train_eps": eps,
            "epochs": epochs,
            "seconds": trained,
            "reference_seconds": seconds,
            "collapsed_epoch": collapsed,
            **evaluate(model, reference, x, y, [*evaluated, SANITY_EPS]),
        }
        _results.append_run(log, result)
        print(
            f"{dataset} seed {seed} {name}{'' if eps is None else f' eps {eps:g}'}: "
            f"clean {result['clean']:.4f}, robust {result['accuracy']}, {trained:.0f} s",
            flush=True,
        )
        results.append(result)
    return results


def cell(values, expected, digits=(4, 3)):
    """Mean (min-max) of ``values``, and their number if not ``expected``
    (the seeds, times the models per seed); None values are left out."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean, spread = digits
    text = f"{statistics.mean(values):.{mean}f} ({min(values):.{spread}f}-{max(values):.{spread}f})"
    return text if len(values) == expected else f"{text} [{len(values)} of {expected} runs]"


def select(runs, dataset, name, pick, eps=None, eps_list=None):
    """``pick(run)`` for each run of model kind ``name`` on ``dataset``;
    with ``eps``, only the runs evaluated at it (and, of the models trained
    per eps, the one trained at it); with ``eps_list``, only the models
    trained per eps at one of them."""
    return [
        pick(r)
        for r in runs
        if r["data"] == dataset
        and r["model"] == name
        and (name not in PER_EPS or eps is None or r["train_eps"] == eps)
        and (name not in PER_EPS or eps_list is None or r["train_eps"] in eps_list)
        and (eps is None or f"{eps:g}" in r["accuracy"])  # a run of other eps
    ]


def time_ratio(run):
    """Training seconds of ``run`` over those of its seed's cross-entropy
    model, trained in the same process just before (runs logged before the
    reference time was recorded have none)."""
    reference = run.get("reference_seconds")
    return run["seconds"] / reference if reference else None


def table(runs, datasets, eps_list, command, seeds):
    lines = [f"Produced by: `{command}`", ""]
    header = ["| | " + " | ".join(MODELS) + " |", "| --- |" + " --- |" * len(MODELS)]
    for dataset in datasets:
        lines += [f"### {dataset}: test accuracy, mean (min-max) over seeds", "", *header]
        for eps in eps_list:
            key = f"{eps:g}"
            cells = [
                cell(select(runs, dataset, m, lambda r, key=key: r["accuracy"][key], eps), seeds)
                for m in MODELS
            ]
            lines.append(f"| PGD/transfer, eps {eps:g} | " + " | ".join(cells) + " |")
        # Rows over every model of a method: one PGD-AT model per eps.
        models = {m: seeds * (len(eps_list) if m in PER_EPS else 1) for m in MODELS}
        rows = [
            ("clean", lambda r: r["clean"], (4, 3)),
            (
                f"eps {SANITY_EPS:g} (must be ~0)",
                lambda r: r["accuracy"][f"{SANITY_EPS:g}"],
                (4, 3),
            ),
            ("training seconds", lambda r: r["seconds"], (0, 0)),
            ("training time / cross-entropy's (same process)", time_ratio, (2, 2)),
        ]
        for title, pick, digits in rows:
            cells = [
                cell(select(runs, dataset, m, pick, None, eps_list), models[m], digits)
                for m in MODELS
            ]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        collapses = [
            (
                f"{sum(c is not None for c in chosen)} of {len(chosen)}"
                if (
                    chosen := select(
                        runs, dataset, m, lambda r: r.get("collapsed_epoch"), None, eps_list
                    )
                )
                else ""
            )
            if m in WATCHED
            else "-"
            for m in MODELS
        ]
        lines.append(
            "| catastrophic overfitting (runs stopped early) | " + " | ".join(collapses) + " |"
        )
        masked = [
            f"{r['model']} seed {r['seed']} eps {eps}"
            for r in runs
            if r["data"] == dataset
            for eps, moved in r["transfer"].items()
            if moved < r["white_box"][eps] - 1e-9
        ]
        lines += [
            "",
            "Transfer beat white-box (gradient masking): " + (", ".join(masked) or "never"),
            "",
        ]
    return "\n".join(lines)


def figure(runs, datasets, eps_list, command, path):
    """Test accuracy against eps per dataset, one line per model kind."""

    def points(dataset, name):
        for eps in eps_list:
            pick = lambda r, key=f"{eps:g}": r["accuracy"][key]  # noqa: E731
            if values := select(runs, dataset, name, pick, eps):
                yield eps, statistics.mean(values), min(values), max(values)

    panels = {d: {name: list(points(d, name)) for name in MODELS} for d in datasets}
    _results.accuracy_figure(panels, "eps (L-inf)", command, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits,digits28")
    parser.add_argument("--eps", default="0.05,0.1,0.2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--output", default=os.path.join("runs", "robustness"))
    parser.add_argument(
        "--models",
        default=",".join(MODELS[1:]),
        help=f"comma-separated models to train besides the cross-entropy: {', '.join(MODELS[1:])}",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="train on the training data less its validation split and attack that split "
        "instead of the test set (to choose settings without the test set)",
    )
    _results.add_report_only(parser)
    args = parser.parse_args(argv)
    datasets = args.data.split(",")
    eps_list = [float(e) for e in args.eps.split(",")]
    models = [m for m in args.models.split(",") if m]
    if unknown := set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    command = _results.command_line("robustness.py", argv)
    log, runs = _results.load_runs(args.output)
    runs = latest([r for r in runs if r["epochs"] == args.epochs])
    for dataset in datasets:
        for seed in range(args.seeds):
            done = finished(runs, eps_list)
            if args.report_only or all(
                (dataset, seed, name, eps) in done
                for name, eps in plan(["cross-entropy", *models], eps_list)
            ):
                continue
            runs = latest(
                runs
                + run_seed(dataset, seed, eps_list, args.epochs, done, log, models, args.validation)
            )
    markdown = table(runs, datasets, eps_list, command, args.seeds)
    if args.validation:
        markdown = markdown.replace("test accuracy", "validation-split accuracy")
    with open(os.path.join(args.output, "robustness.md"), "w") as file:
        file.write(markdown + "\n")
    figure(runs, datasets, eps_list, command, os.path.join(args.output, "robustness.png"))
    print("\n" + markdown)


if __name__ == "__main__":
    main()
