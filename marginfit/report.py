"""The report of `marginfit compare`: a Markdown table and PNG figures."""

import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from marginfit import files  # noqa: E402
from marginfit.attacks import LOSSES, adversarial_accuracy  # noqa: E402

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


def _figure(path, command, draw):
    figure, axes = plt.subplots(figsize=(6, 4))
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
    ``curves[method]`` (the clean run's history) and
    ``distances[method][layer]`` (test examples' distances)."""
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

    def attacks(axes):
        for name in names:
            for attack, style in (("fgsm", "-o"), ("pgd", "--s")):
                axes.plot(
                    eps_list, results["attacks"][name][attack], style, label=f"{name} {attack}"
                )
        axes.set(xlabel="eps (L-inf)", ylabel="test accuracy", title="Accuracy under attack")
        axes.legend()

    figures.append(
        ("Accuracy under attack", _figure(os.path.join(output, "robustness.png"), command, attacks))
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
    lines = [
        "# marginfit compare",
        "",
        f"Produced by: `{command}`",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
        *(f"| {label} | " + " | ".join(rest) + " |" for label, *rest in rows),
        "",
    ]
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", "", f"Produced by: `{command}`", ""]
    path = os.path.join(output, "report.md")
    summary = {key: results[key] for key in ("command", "methods", "noise", "attacks", "seconds")}
    files.write_text(os.path.join(output, "results.json"), json.dumps(summary, indent=2))
    files.write_text(path, "\n".join(lines))
    return path
