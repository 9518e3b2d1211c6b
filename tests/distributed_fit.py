"""Trains the same model on one device and under MirroredStrategy over two
logical CPUs, on the same global batches; prints a JSON report."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
# Same results for the same inputs however busy the machine is: what is left
# between the two runs is the float32 reassociation of the replicas' sums.
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import CE, conv_net, digits  # noqa: E402

from marginfit import LargeMargin  # noqa: E402

MARGIN = LargeMargin(
    ["input", "conv", "dense"],
    competitors="top",
    gamma=[0.8, 0.6, 0.4],
    norm=1,
    alpha=2.0,
    top_k=2,
    aggregation="sum",
    approximate=False,
)


BATCH = 16


def train(strategy, reverse_batches=False):
    """``reverse_batches`` reverses the examples inside each batch: the same
    gradients, summed in another order."""
    with strategy.scope():
        model, _ = conv_net(MARGIN, regularizer=keras.regularizers.L2(1e-3))
        model.compile(keras.optimizers.SGD(0.5), loss=CE)
    x, y = digits(64)
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    if reverse_batches:
        order = np.arange(len(x)).reshape(-1, BATCH)[:, ::-1].reshape(-1)
        x, y, weights = x[order], y[order], weights[order]
    history = model.fit(
        x, y, sample_weight=weights, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    logs = {key: float(values[-1]) for key, values in history.history.items()}
    return model, logs


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model, mirrored_logs = train(mirrored)
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    reference, single_logs = train(one_device)
    reordered, reordered_logs = train(one_device, reverse_batches=True)
    initial, _ = conv_net(MARGIN)
    pairs = list(zip(model.get_weights(), reference.get_weights()))
    rounding = list(zip(reordered.get_weights(), reference.get_weights()))
    print(
        json.dumps(
            {
                "replicas": mirrored.num_replicas_in_sync,
                "max_weight_difference": max(float(np.abs(a - b).max()) for a, b in pairs),
                # What float32 rounding alone moves the weights by.
                "max_rounding_difference": max(float(np.abs(a - b).max()) for a, b in rounding),
                "max_weight_change": max(
                    float(np.abs(a - b).max())
                    for a, b in zip(reference.get_weights(), initial.get_weights())
                ),
                "mirrored": mirrored_logs,
                "single": single_logs,
                "reordered": reordered_logs,
            }
        )
    )


if __name__ == "__main__":
    main()
