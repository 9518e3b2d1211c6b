"""Training-step time of MarginModel relative to plain cross-entropy.

Builds the small CNN of the paper's MNIST setting (28x28x1 inputs, two 5x5
conv layers of 32 and 64 filters each followed by 2x2 max-pooling, dense 512,
10 classes; batch 64; margin on the input and both pooled outputs, top_k=1)
and times, interleaved in one process, `train_on_batch` of the margin model
(approximate and exact) against a plain `keras.Model` on the same layers
compiled with sparse categorical cross-entropy. Prints a table and a JSON
line of ratios (margin step / CE step): absolute times alone mean little.

    python benchmarks/step_time.py [--repeats 7] [--steps 10]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import marginfit  # noqa: E402

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def cnn(margin, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(32, 5, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(64, 5, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Dense(512, activation="relu")(keras.layers.Flatten()(x))
    logits = keras.layers.Dense(10)(x)
    if margin is None:
        model = keras.Model(inputs, logits)
    else:
        model = marginfit.MarginModel(inputs, logits, margin=margin)
    model.compile(keras.optimizers.SGD(1e-3), loss=CE)
    return model


def step_seconds(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.random((args.batch_size, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, args.batch_size)
    layers = ["input", "pool1", "pool2"]
    models = {
        "ce": cnn(None),
        "approximate": cnn(marginfit.LargeMargin(layers, approximate=True)),
        "exact": cnn(marginfit.LargeMargin(layers, approximate=False)),
    }
    for model in models.values():  # trace and warm up
        step_seconds(model, x, y, 3)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step_seconds(model, x, y, args.steps))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: median[name] / median["ce"] for name in models if name != "ce"}
    print(f"{'variant':<12} {'median step (ms)':>17} {'ratio to CE':>12}")
    for name in models:
        ratio = 1.0 if name == "ce" else ratios[name]
        print(f"{name:<12} {1e3 * median[name]:>17.1f} {ratio:>12.2f}")
    print(json.dumps({"batch_size": args.batch_size, "ratios": ratios}))


if __name__ == "__main__":
    main()
