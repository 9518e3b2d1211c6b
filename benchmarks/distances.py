"""Reported distances against measured ones on `marginfit train`'s network.

For each dataset and each training (the default margin; cross-entropy
alone), trains the network of `marginfit compare` (same optimizers, weight
average, epochs) on the clean labels and compares, on the correctly
classified test examples, the medians of three distances to the decision
boundary at the input (L2, pixels) and at each hidden margin layer (L2, the
layer's units):

- measured: the smallest perturbation found that flips the prediction
  (`marginfit.attacks.minimal_perturbation`: DeepFool, then bisection), of
  the input, or of the layer's activations fed to the network above it;
- reported: what `MarginModel.margin_distances` reports, the logits'
  first-order distance to the nearest boundary (of the 9 highest-scoring
  competitors), and logged: the same to the top competitor's boundary,
  whose mean the ``distance_<layer>`` logs are;
- probability estimate: the loss's own quantity in its default space,
  ``(p_y - p_j) / (||grad (p_y - p_j)|| + 1e-6)`` of the top competitor,
  which the logs reported as the distance before.

Prints each median and its ratio to the measured one, and writes
``distances.md`` and ``distances.json`` into --output.

    python benchmarks/distances.py [--data digits,digits28] [--epochs 60]
        [--seed 0] [--output benchmarks/results/distances]
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _results  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from marginfit import MarginModel, attacks  # noqa: E402
from marginfit import methods as methods_lib  # noqa: E402
from marginfit.experiments import Experiment  # noqa: E402
from marginfit.margin import INPUT  # noqa: E402

TRAININGS = {"defaults": methods_lib.MARGIN, "cross-entropy": methods_lib.CROSS_ENTROPY}


def probability_estimate(model, x, y, epsilon=1e-6):
    """``[n]`` first-order distance of the softmax difference to the top
    competitor at the input, L2 (the loss's quantity in its default space)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        probabilities = tf.nn.softmax(model(x, training=False))
        label = tf.gather(probabilities, y, axis=1, batch_dims=1)
        other = tf.reduce_max(tf.where(tf.one_hot(y, 10) > 0, -1.0, probabilities), axis=-1)
        difference = label - other
    gradient = tf.reshape(tape.gradient(difference, x), [len(y), -1])
    return (difference / (tf.norm(gradient, axis=-1) + epsilon)).numpy()


def measured(model, layer, x, y):
    """``[n]`` minimal L2 perturbations at ``layer`` (the input, or a hidden
    layer's activations fed to the network above it)."""
    if layer == INPUT:
        return attacks.minimal_perturbation(model, x, y, norm=2)[0]
    tensor = model.get_layer(layer).output
    below = keras.Model(model.inputs, tensor)
    above = keras.Model(tensor, model.outputs)
    return attacks.minimal_perturbation(above, below.predict(x, verbose=0), y, norm=2)[0]


def medians(model, margin, x, y):
    """``{layer: {"measured", "reported", ["probability estimate"]}}``
    medians over the correctly classified examples."""
    wrapped = MarginModel.wrap(model, margin)
    reported = wrapped.margin_distances(x, y)
    logged = wrapped.margin_distances(x, y, competitors=1)
    result = {}
    for layer in margin.layers:
        sizes = measured(model, layer, x, y)
        correct = (sizes > 0) & np.isfinite(sizes)
        row = {
            "measured": float(np.median(sizes[correct])),
            "reported": float(np.median(reported[layer][correct])),
            "logged": float(np.median(logged[layer][correct])),
        }
        if layer == INPUT:
            row["probability estimate"] = float(
                np.median(probability_estimate(model, x, y)[correct])
            )
        result[layer] = row
    return result


def table(results, command):
    lines = [
        f"Produced by: `{command}`",
        "",
        "Medians over the correctly classified test examples, L2, in the units of "
        "each layer (pixels at the input); in brackets, the ratio to the measured one.",
        "",
        "| data | training | layer | measured | reported | logged | probability estimate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (dataset, training), layers in results.items():
        for layer, row in layers.items():
            cells = [f"{row['measured']:.4g}"]
            for key in ("reported", "logged", "probability estimate"):
                value = row.get(key)
                cells.append(
                    "" if value is None else f"{value:.4g} ({value / row['measured']:.3g}x)"
                )
            lines.append(f"| {dataset} | {training} | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits,digits28")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join("runs", "distances"))
    args = parser.parse_args(argv)
    results = {}
    for dataset in args.data.split(","):
        for training, method in TRAININGS.items():
            experiment = Experiment(data=dataset, seed=args.seed, epochs=args.epochs)
            model, margin, _, (x, y), _ = _results.train(experiment, method)
            results[(dataset, training)] = medians(model, margin, x, y)
            for layer, row in results[(dataset, training)].items():
                print(dataset, training, layer, json.dumps(row), flush=True)
    command = _results.command_line("distances.py", argv)
    markdown = table(results, command)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "distances.md"), "w") as file:
        file.write(markdown)
    with open(os.path.join(args.output, "distances.json"), "w") as file:
        saved = [{"data": d, "training": t, "layers": v} for (d, t), v in results.items()]
        json.dump({"command": command, "results": saved}, file, indent=2)
    print(markdown)


if __name__ == "__main__":
    main()
