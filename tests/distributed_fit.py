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
from helpers import CE, conv_net, digits, distribution_margin  # noqa: E402

MARGIN = distribution_margin()


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


def poisoned(strategy, poison):
    """Weights after one epoch over four batches of ``BATCH`` in the order
    1, 2, 3, 4, where batch 2 has a NaN pixel in one example if ``poison``,
    and is left out otherwise (1, 3, 4). Returns ``(weights, logs)``."""
    with strategy.scope():
        model, _ = conv_net(MARGIN)
        model.compile(keras.optimizers.Adam(0.01), loss=CE)
    x, y = digits(4 * BATCH)
    if poison:
        x = x.copy()
        x[BATCH + 3, 4, 4, 0] = np.nan
    else:
        keep = np.r_[0:BATCH, 2 * BATCH : 4 * BATCH]
        x, y = x[keep], y[keep]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    history = model.fit(data, epochs=1, verbose=0)
    return model.get_weights(), {key: float(v[-1]) for key, v in history.history.items()}


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model, mirrored_logs = train(mirrored)
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    reference, single_logs = train(one_device)
    reordered, reordered_logs = train(one_device, reverse_batches=True)
    clean_weights, _ = poisoned(mirrored, poison=False)
    poisoned_weights, poisoned_logs = poisoned(mirrored, poison=True)
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
                # A batch with a NaN on one replica changes nothing.
                "poisoned_max_difference": max(
                    float(np.abs(a - b).max()) for a, b in zip(clean_weights, poisoned_weights)
                ),
                "poisoned_nonfinite_steps": poisoned_logs["nonfinite_steps"],
                "mirrored": mirrored_logs,
                "single": single_logs,
                "reordered": reordered_logs,
            }
        )
    )


if __name__ == "__main__":
    main()
