"""Trains the same models as one process or as one worker of a cluster.

python multi_worker_fit.py OUT.json [INDEX PORT,PORT,...]

Without INDEX, trains in one process; with it, sets TF_CONFIG for worker
INDEX of a localhost cluster on the given ports and trains under
MultiWorkerMirroredStrategy. Either way it fits, on the same global batches,
a MarginModel with each margin of `helpers.DISTRIBUTION_MARGINS`, and the
defaults with `marginfit.SAM` (per-group optimizers: Adam and SGD with
momentum, as `resume_worker.py` has them; sample weights, an L2
regularizer), in float64, and writes their final weights and logs to
OUT.json.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if len(sys.argv) > 2:
    from marginfit.cluster import local_tf_config

    os.environ["TF_CONFIG"] = local_tf_config(sys.argv[3].split(","), sys.argv[2])

import tensorflow as tf  # noqa: E402

# Created before anything else touches TensorFlow's runtime, as it must be.
STRATEGY = (
    tf.distribute.MultiWorkerMirroredStrategy()
    if "TF_CONFIG" in os.environ
    else tf.distribute.get_strategy()
)
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from nets import DISTRIBUTION_MARGINS, conv_net, digits, float64  # noqa: E402
from rounding import max_difference  # noqa: E402

import marginfit  # noqa: E402

BATCH = 16
RUNS = {
    **{name: (margin, None) for name, margin in DISTRIBUTION_MARGINS.items()},
    # Every worker's replicas perturb with the gradient of the global batch.
    "defaults+sam": (DISTRIBUTION_MARGINS["defaults"], marginfit.SAM),
}
"""Each run's margin and update rule (a class: made inside the scope)."""


def train(margin, update_rule=None):
    """Final weights, last training logs and evaluation logs, in float64
    (`rounding` says why)."""
    with float64(), STRATEGY.scope():
        regularizer = keras.regularizers.L2(1e-3)
        rule = update_rule() if update_rule else None
        model, _ = conv_net(margin, regularizer=regularizer, update_rule=rule)
        optimizer = marginfit.discriminative_optimizer(
            model,
            [
                (keras.optimizers.Adam(1e-2, name="features"), ["conv"]),
                (keras.optimizers.SGD(0.1, momentum=0.5, name="head"), ["dense", "logits"]),
            ],
        )
        # A loss computes in the floatx of its creation.
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer, loss=loss, metrics=["accuracy"])
        x, y = digits(64, dtype="float64")
        weights = np.linspace(0.5, 1.5, len(x))
        initial = model.get_weights()
        history = model.fit(
            x, y, sample_weight=weights, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
        )
        evaluation = model.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0)
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "max_weight_change": max_difference(model.get_weights(), initial),
        "logs": {key: float(values[-1]) for key, values in history.history.items()},
        "evaluation": {key: float(value) for key, value in evaluation.items()},
    }


def main(path):
    report = {
        "replicas": STRATEGY.num_replicas_in_sync,
        **{name: train(margin, rule) for name, (margin, rule) in RUNS.items()},
    }
    with open(path, "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(sys.argv[1])
