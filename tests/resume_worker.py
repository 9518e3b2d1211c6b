"""Trains with `marginfit.BackupAndRestore`, resuming any backup in DIR.

python resume_worker.py DIR [INDEX PORT,PORT,...]

Fits a MarginModel (the default margin, per-group optimizers) for 3 epochs
of 8 steps on fixed batches, backing up every 3 steps into DIR/backup, and
prints "step EPOCH BATCH" after each step. It starts training (and reads any
backup) once a line arrives on stdin, so that a test can start it early.
With INDEX it is worker INDEX of a localhost cluster (TF_CONFIG) under
MultiWorkerMirroredStrategy. It runs on the Keras backend that
KERAS_BACKEND names. At the end it writes the final weights to
DIR/final<INDEX>.npz.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from marginfit import cluster  # noqa: E402

INDEX = sys.argv[2] if len(sys.argv) > 2 else ""
if INDEX:
    os.environ["TF_CONFIG"] = cluster.local_tf_config(sys.argv[3].split(","), INDEX)

import keras  # noqa: E402

STRATEGY = cluster.strategy()
if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()

import numpy as np  # noqa: E402
from nets import conv_net, digits  # noqa: E402

import marginfit  # noqa: E402

MARGIN = marginfit.LargeMargin(["input", "conv", "dense"])


class Progress(keras.callbacks.Callback):
    """Prints each finished step; slow enough to be killed mid-epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        print(f"step {self.epoch} {batch}", flush=True)
        time.sleep(0.05)


def main(directory):
    with STRATEGY.scope():
        model, _ = conv_net(MARGIN)
        optimizer = marginfit.discriminative_optimizer(
            model,
            [
                (keras.optimizers.Adam(1e-2, name="features"), ["conv"]),
                (keras.optimizers.SGD(0.1, momentum=0.5, name="head"), ["dense", "logits"]),
            ],
        )
        model.compile(optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = digits(128)
    backup = marginfit.BackupAndRestore(os.path.join(directory, "backup"), save_freq=3)
    sys.stdin.readline()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[backup, Progress()],
    )
    np.savez(os.path.join(directory, f"final{INDEX}.npz"), *model.get_weights())


if __name__ == "__main__":
    main(sys.argv[1])
