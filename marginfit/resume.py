"""Resuming an interrupted `fit()` exactly where it stopped, also mid-epoch
and on a cluster.

`BackupAndRestore` is Keras' callback of that name with three changes:

- A backup is one directory, ``<backup_dir>/state`` (weights with optimizer
  state, and the epoch and step reached), swapped into place atomically
  (`marginfit.files`): a process killed while writing leaves the previous
  backup whole.
- It resumes mid-epoch: Keras restarts the interrupted epoch from its first
  batch, applying the steps before the backup twice; here the model passes
  over those batches without training on them (`SkippingTrainFunction`), so
  the run ends with the weights of an uninterrupted one.
- On a cluster (``TF_CONFIG``) only the chief writes the backup; every
  worker restores from it (`marginfit.cluster`).
"""

import json
import os
import shutil
import tempfile

import keras

from marginfit import cluster, files

_STATE = "state"
_WEIGHTS = "latest.weights.h5"
_METADATA = "training_metadata.json"


@keras.saving.register_keras_serializable(package="marginfit")
class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that writes atomically, resumes
    mid-epoch and writes once per cluster (see the module docstring).

    Resuming mid-epoch needs a `marginfit.MarginModel` (which skips the
    steps already trained) and the same batches in the same order in every
    run (``shuffle=False``, or a dataset with a fixed seed).

    Args:
        backup_dir: Directory of the backup; nothing else may write there.
        save_freq: ``"epoch"`` or a number of steps between backups.
        delete_checkpoint: Whether to delete the backup once `fit()` ends.
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
        self.state_dir = os.path.join(backup_dir, _STATE)
        self._weights_path = os.path.join(self.state_dir, _WEIGHTS)
        self._training_metadata_path = os.path.join(self.state_dir, _METADATA)
        self._steps_in_epoch = 0

    def get_config(self):
        return {
            "backup_dir": self.backup_dir,
            "save_freq": self.save_freq,
            "delete_checkpoint": self.delete_checkpoint,
        }

    def _load_model(self):
        super()._load_model()
        if os.path.exists(self._training_metadata_path):
            with open(self._training_metadata_path) as file:
                steps = json.load(file).get("steps_in_epoch", 0)
            skip_steps(self.model, steps)
            self._steps_in_epoch = steps

    def on_epoch_begin(self, epoch, logs=None):
        # Keras counts epochs from the end of the first one it ran.
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._steps_in_epoch = batch + 1
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._steps_in_epoch = 0
        super().on_epoch_end(epoch, logs)

    def _save_model(self):
        metadata = {
            "epoch": self._current_epoch,
            "batch": self._last_batch_seen,
            "steps_in_epoch": self._steps_in_epoch,
        }
        # Every worker saves (saving may involve all of them); only the
        # chief's copy is kept.
        parent = self.backup_dir if cluster.is_chief() else tempfile.mkdtemp()
        staging = files.staging_directory(parent)
        try:
            self.model.save_weights(os.path.join(staging, _WEIGHTS))
            with open(os.path.join(staging, _METADATA), "w") as file:
                json.dump(metadata, file)
            if cluster.is_chief():
                files.replace_directory(staging, self.state_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not cluster.is_chief():
                shutil.rmtree(parent, ignore_errors=True)

    def on_train_end(self, logs=None):
        if cluster.is_chief():
            super().on_train_end(logs)


def skip_steps(model, steps):
    """Makes ``model`` pass over its next ``steps`` training batches without
    training on them (a `MarginModel`; others raise `TypeError`)."""
    if steps and not hasattr(model, "steps_to_skip"):
        raise TypeError(
            f"Resuming mid-epoch needs a marginfit.MarginModel; {type(model).__name__} "
            "would train on the interrupted epoch's first batches twice. Back up once "
            "per epoch (save_freq='epoch'), or use a MarginModel."
        )
    if steps:
        model.steps_to_skip = steps


class SkippingTrainFunction:
    """Wraps a model's ``train_function``: while ``model.steps_to_skip`` is
    positive, a call takes the next batch from the iterator and drops it,
    training nothing, and returns the current logs (TensorFlow's
    ``function(iterator)``, PyTorch's ``function(batch)``), or no logs and
    the state unchanged (JAX's ``function(state, iterator)``)."""

    def __init__(self, model, function):
        self.model = model
        self.function = function

    def __call__(self, *args):
        if self.model.steps_to_skip <= 0:
            return self.function(*args)
        *state, iterator = args
        if self.model.steps_per_execution != 1:
            raise ValueError(
                "Resuming mid-epoch needs steps_per_execution=1; back up once per "
                "epoch (save_freq='epoch') with a larger steps_per_execution."
            )
        if hasattr(iterator, "__next__"):
            next(iterator)  # PyTorch's step is given its batch instead
        self.model.steps_to_skip -= 1
        if state:
            return {}, state[0]
        return self.model.get_metrics_result()
