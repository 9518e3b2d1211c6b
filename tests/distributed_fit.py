"""Trains the same models on one device and under MirroredStrategy over two
logical CPUs, on the same global batches; prints a JSON report."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
# Same results for the same inputs however busy the machine is: what is left
# between the two runs is the reassociation of the replicas' sums.
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import CE, DISTRIBUTION_MARGINS, conv_net, digits  # noqa: E402
from nets import float64  # noqa: E402
from rounding import max_difference  # noqa: E402

import marginfit  # noqa: E402

BATCH = 16
RUNS = {
    "defaults": ("defaults", None),
    "authors": ("authors", None),
    # SAM's replicas perturb with the global batch's gradient.
    "defaults+sam": ("defaults", marginfit.SAM()),
}
"""Each run's margin and update rule. The exact second-order gradients
across replicas are checked on two workers (`multi_worker_fit.py`)."""


class BatchLogs(keras.callbacks.Callback):
    """Keeps the logs of every training batch."""

    def on_train_begin(self, logs=None):
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append({key: float(value) for key, value in logs.items()})


def train(strategy, margin, update_rule=None):
    """Weights and last logs after 2 epochs of 4 batches, in float64
    (`rounding` says why)."""
    with float64(), strategy.scope():
        regularizer = keras.regularizers.L2(1e-3)
        model, _ = conv_net(margin, regularizer=regularizer, update_rule=update_rule)
        # A loss computes in the floatx of its creation.
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(keras.optimizers.SGD(0.05), loss=loss)
        x, y = digits(64, dtype="float64")
        weights = np.linspace(0.5, 1.5, len(x))
        history = model.fit(
            x, y, sample_weight=weights, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
        )
    logs = {key: float(values[-1]) for key, values in history.history.items()}
    return model.get_weights(), logs


def poisoned(strategy, margin, poison):
    """Weights after one epoch over four batches of ``BATCH`` in the order
    1, 2, 3, 4, where batch 2 has a NaN pixel in one example if ``poison``,
    and is left out otherwise (1, 3, 4). Returns ``(weights, epoch logs,
    batch logs)``."""
    with strategy.scope():
        model, _ = conv_net(margin)
        model.compile(keras.optimizers.Adam(0.01), loss=CE)
    x, y = digits(4 * BATCH)
    if poison:
        x = x.copy()
        x[BATCH + 3, 4, 4, 0] = np.nan
    else:
        keep = np.r_[0:BATCH, 2 * BATCH : 4 * BATCH]
        x, y = x[keep], y[keep]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    batches = BatchLogs()
    history = model.fit(data, epochs=1, verbose=0, callbacks=[batches])
    logs = {key: float(v[-1]) for key, v in history.history.items()}
    return model.get_weights(), logs, batches.batches


def compare(run, mirrored, one_device):
    name, update_rule = RUNS[run]
    margin = DISTRIBUTION_MARGINS[name]
    weights, mirrored_logs = train(mirrored, margin, update_rule)
    reference, single_logs = train(one_device, margin, update_rule)
    with float64():
        initial, _ = conv_net(margin)
    return {
        "weights": [w.tolist() for w in weights],
        "single_weights": [w.tolist() for w in reference],
        "max_weight_change": max_difference(reference, initial.get_weights()),
        "mirrored": mirrored_logs,
        "single": single_logs,
    }


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    defaults = DISTRIBUTION_MARGINS["defaults"]
    clean_weights, _, _ = poisoned(mirrored, defaults, poison=False)
    poisoned_weights, poisoned_logs, poisoned_batches = poisoned(mirrored, defaults, poison=True)
    report = {
        "replicas": mirrored.num_replicas_in_sync,
        "margins": {run: compare(run, mirrored, one_device) for run in RUNS},
        # A batch with a NaN on one replica changes nothing.
        "poisoned_max_difference": max_difference(clean_weights, poisoned_weights),
        "poisoned_nonfinite_steps": poisoned_logs["nonfinite_steps"],
        "poisoned_batch_nonfinite_steps": [logs["nonfinite_steps"] for logs in poisoned_batches],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
