"""Trains the same models on one device and under
`keras.distribution.DataParallel` over two CPU devices (JAX), on the same
global batches; prints a JSON report (`test_backends.py`)."""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from nets import DISTRIBUTION_MARGINS, conv_net, digits  # noqa: E402

BATCH = 16
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train(margin, initial, nudge_weights=False):
    """Weights and last logs after 2 epochs of 4 batches (as
    `distributed_fit.py` does on TensorFlow); ``nudge_weights`` moves every
    sample weight by one float32 ulp, to measure float32 rounding alone."""
    model, _ = conv_net(DISTRIBUTION_MARGINS[margin], regularizer=keras.regularizers.L2(1e-3))
    model.set_weights(initial)
    model.compile(keras.optimizers.SGD(0.05), loss=CE)
    x, y = digits(64)
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    if nudge_weights:
        weights = np.nextafter(weights, np.float32(np.inf))
    history = model.fit(
        x, y, sample_weight=weights, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    logs = {key: float(values[-1]) for key, values in history.history.items()}
    return model.get_weights(), logs


def poisoned(initial, poison):
    """Weights and logs after one epoch over batches 1-4 where batch 2 has a
    NaN pixel (``poison``), or over batches 1, 3, 4."""
    model, _ = conv_net(DISTRIBUTION_MARGINS["defaults"])
    model.set_weights(initial)
    model.compile(keras.optimizers.Adam(0.01), loss=CE)
    x, y = digits(4 * BATCH)
    if poison:
        x = x.copy()
        x[BATCH + 3, 4, 4, 0] = np.nan
    else:
        keep = np.r_[0:BATCH, 2 * BATCH : 4 * BATCH]
        x, y = x[keep], y[keep]
    # Batches from a generator: `fit()` checks arrays whole, NaN included.
    batches = ((x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH))
    history = model.fit(batches, epochs=1, verbose=0)
    return model.get_weights(), {key: float(v[-1]) for key, v in history.history.items()}


def max_difference(ours, theirs):
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


def main():
    initial = conv_net(None, regularizer=keras.regularizers.L2(1e-3))[0].get_weights()
    single = {margin: train(margin, initial) for margin in DISTRIBUTION_MARGINS}
    nudged = {margin: train(margin, initial, nudge_weights=True) for margin in DISTRIBUTION_MARGINS}
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    parallel = {margin: train(margin, initial) for margin in DISTRIBUTION_MARGINS}
    clean, bad = poisoned(initial, False), poisoned(initial, True)
    report = {"devices": len(jax.devices()), "margins": {}}
    for margin in DISTRIBUTION_MARGINS:
        report["margins"][margin] = {
            "max_weight_change": max_difference(single[margin][0], initial),
            "max_weight_difference": max_difference(parallel[margin][0], single[margin][0]),
            "max_rounding_difference": max_difference(nudged[margin][0], single[margin][0]),
            "single": single[margin][1],
            "parallel": parallel[margin][1],
            "nudged": nudged[margin][1],
        }
    report["poisoned_nonfinite_steps"] = bad[1]["nonfinite_steps"]
    report["poisoned_max_difference"] = max_difference(bad[0], clean[0])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
