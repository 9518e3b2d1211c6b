"""The report of `marginfit compare`: a Markdown table and PNG figures."""

import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from marginfit import attacks, files  # noqa: E402
from marginfit.attacks import LOSSES, adversarial_accuracy  # noqa: E402
from marginfit.margin import INPUT  # noqa: E402

PGD = {"steps": 20, "restarts": 3, "loss": LOSSES}
"""The evaluation's PGD: 20 steps of 2.5 eps / 20 from each of 3 random
starts, on the cross-entropy and on the Carlini-Wagner margin; an example
counts as robust only if every one fails."""


def robustness(model, x, y, eps_list):
    """``{"fgsm": [accuracy per eps], "pgd": [...]}`` on ``(x, y)``, PGD as
    `PGD` says."""
    return {
        "fgsm": [adversarial_accuracy(model, x, y, eps, "fgsm") for eps in eps_list],
        "pgd": [adversarial_accuracy(model, x, y, eps, "pgd", **PGD) for eps in eps_list],
    }


def measured_distances(model, x, y, norm):
    """``[n]`` sizes of the smallest perturbations of the inputs that flip
    the predictions (`attacks.minimal_perturbation`) in the margin's
    ``norm`` (0 where already misclassified); None for the 1-norm, which
    it does not measure."""
    if norm not in (2, np.inf):
        return None
    return attacks.minimal_perturbation(model, x, y, norm=2 if norm == 2 else "inf")[0]


def _correct(values):
    """The distances of the correctly classified examples (> 0), finite."""
    values = np.asarray(values)
    return values[(values > 0) & np.isfinite(values)]


def _median(values):
    """Median distance of the correctly classified examples."""
    correct = _correct(values)
    return float(np.median(correct)) if len(correct) else float("nan")


def _figure(path, command, draw, panels=1):
    figure, axes = plt.subplots(1, panels, figsize=(6 if panels == 1 else 3.2 * panels, 4))
    draw(axes)
    figure.text(0.01, 0.01, f"produced by: {command}", fontsize=6, color="gray")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)
    return os.path.basename(path)


def write(results, output, eps_list):
    """Writes the figures, ``results.json`` and ``report.md``; returns the
    report's path.

    ``results`` holds ``command``, ``methods`` (the names, in order),
    ``noise[level][method]`` (test accuracy), ``attacks[method][attack]``
    (accuracy per eps), ``seconds[method]`` (training time at clean labels),
    ``curves[method]`` (the clean run's history),
    ``distances[method][layer]`` (test examples' estimated distances, from
    `MarginModel.margin_distances`) and ``measured[method]`` (their measured
    distances at the input, `measured_distances`, or None)."""
    command = results["command"]
    names = results["methods"]
    figures = []

    def curves(axes):
        for name in names:
            history = results["curves"][name]
            axes.plot(history["accuracy"], label=f"{name} train")
            axes.plot(history["val_accuracy"], "--", label=f"{name} validation")
        axes.set(xlabel="epoch", ylabel="accuracy", title="Training curves (clean labels)")
        axes.legend()

    figures.append(
        ("Training curves", _figure(os.path.join(output, "curves.png"), command, curves))
    )
    for layer in results["distances"][names[0]]:

        def histogram(axes, layer=layer):
            values = [results["distances"][name][layer] for name in names]
            bins = np.histogram_bin_edges(np.concatenate(values), bins=40)
            for name, layer_values in zip(names, values):
                axes.hist(layer_values, bins=bins, alpha=0.6, label=name)
            axes.set(
                xlabel=f"estimated distance to the boundary at {layer!r}",
                ylabel="test examples",
                title=f"Distances at {layer}",
            )
            axes.legend()

        figures.append(
            (
                f"Distances at {layer}",
                _figure(os.path.join(output, f"distances_{layer}.png"), command, histogram),
            )
        )

    measured = {name: results["measured"][name] for name in names}
    # None for every method where the margin's norm is not measured.
    was_measured = all(values is not None for values in measured.values())
    if was_measured:

        def against(axes_list):
            axes_list = np.atleast_1d(axes_list)
            for axes, name in zip(axes_list, names):
                pairs = [("measured (DeepFool)", measured[name])]
                if INPUT in results["distances"][name]:
                    pairs.insert(0, ("estimated", results["distances"][name][INPUT]))
                bins = np.histogram_bin_edges(
                    np.concatenate([_correct(v) for _, v in pairs]), bins=30
                )
                for label, values in pairs:
                    *_, bars = axes.hist(_correct(values), bins=bins, alpha=0.6, label=label)
                    color = bars[0].get_facecolor() if len(bars) else None
                    axes.axvline(_median(values), color=color, linestyle="--")
                axes.set(xlabel="distance at the input", title=name)
                axes.legend(fontsize=7)
            axes_list[0].set(ylabel="correctly classified test examples")

        path = os.path.join(output, "measured_distances.png")
        title = "Distances at the input: estimated and measured"
        figures.append((title, _figure(path, command, against, panels=len(names))))

    def attack_curves(axes):
        for name in names:
            for attack, style in (("fgsm", "-o"), ("pgd", "--s")):
                axes.plot(
                    eps_list, results["attacks"][name][attack], style, label=f"{name} {attack}"
                )
        axes.set(xlabel="eps (L-inf)", ylabel="test accuracy", title="Accuracy under attack")
        axes.legend()

    figures.append(
        (
            "Accuracy under attack",
            _figure(os.path.join(output, "robustness.png"), command, attack_curves),
        )
    )

    rows = [
        (f"test accuracy, {float(noise):.0%} label noise", *(f"{row[m]:.4f}" for m in names))
        for noise, row in results["noise"].items()
    ]
    for attack in ("fgsm", "pgd"):
        rows += [
            (
                f"{attack.upper()} accuracy, eps {eps:g}",
                *(f"{results['attacks'][m][attack][i]:.4f}" for m in names),
            )
            for i, eps in enumerate(eps_list)
        ]
    seconds = (f"{results['seconds'][m]:.1f}" for m in names)
    rows.append(("training seconds, clean labels", *seconds))
    medians = {
        name: {layer: _median(v) for layer, v in results["distances"][name].items()}
        for name in names
    }
    for layer in medians[names[0]]:
        where = "the input" if layer == INPUT else repr(layer)
        cells = (f"{medians[m][layer]:.4g}" for m in names)
        rows.append((f"median distance at {where}, estimated", *cells))
    if was_measured:
        for name in names:
            medians[name]["measured"] = _median(measured[name])
        cells = (f"{medians[m]['measured']:.4g}" for m in names)
        rows.append(("median distance at the input, measured (DeepFool)", *cells))
    lines = [
        "# marginfit compare",
        "",
        f"Produced by: `{command}`",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
        *(f"| {label} | " + " | ".join(rest) + " |" for label, *rest in rows),
        "",
        "Distances are in the units of their layer (pixels at the input) and the "
        "margin's norm; medians are over the correctly classified test examples. "
        "The estimates are `MarginModel.margin_distances` (the logits' first-order "
        "distance); the measured ones are the smallest perturbations found that "
        "flip the prediction (`marginfit.attacks.minimal_perturbation`).",
        "",
    ]
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", "", f"Produced by: `{command}`", ""]
    path = os.path.join(output, "report.md")
    summary = {key: results[key] for key in ("command", "methods", "noise", "attacks", "seconds")}
    summary["median_distances"] = medians
    files.write_text(os.path.join(output, "results.json"), json.dumps(summary, indent=2))
    files.write_text(path, "\n".join(lines))
    return path
