"""Resuming an interrupted `fit()` exactly where it stopped, also mid-epoch
and on a cluster.

`BackupAndRestore` does the job of Keras' callback of that name, on the
public `keras.callbacks.Callback`, with three changes:

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

import contextlib
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
class BackupAndRestore(keras.callbacks.Callback):
    """Backs up the training state while `fit()` runs and resumes from it:
    what `keras.callbacks.BackupAndRestore` does, built on the public
    `keras.callbacks.Callback` with its own state, plus the three changes of
    the module docstring.

    `MarginModel.fit` restores the backup (`restore`) before training and
    starts at its epoch; resuming mid-epoch needs the same batches in the
    same order in every run (``shuffle=False``, or a dataset with a fixed
    seed).

    Args:
        backup_dir: Directory of the backup; nothing else may write there.
        save_freq: ``"epoch"`` or a number of steps between backups.
        delete_checkpoint: Whether to delete the backup once `fit()` ends.
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__()
        if not backup_dir:
            raise ValueError("`backup_dir` is empty: give the directory of the backup.")
        if save_freq != "epoch" and not (
            isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq >= 1
        ):
            raise ValueError(
                f"`save_freq` must be 'epoch' or a number of steps >= 1; received {save_freq!r}."
            )
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self.state_dir = os.path.join(self.backup_dir, _STATE)
        self.restored = False
        self._epoch = self._steps_in_epoch = self._last_batch = self._since_backup = 0

    def get_config(self):
        return {
            "backup_dir": self.backup_dir,
            "save_freq": self.save_freq,
            "delete_checkpoint": self.delete_checkpoint,
        }

    def restore(self, model):
        """Loads the backup, if any, into ``model`` (weights and optimizer
        state) and makes it pass over the batches of the interrupted epoch
        that it already trained on.

        Returns:
            The epoch to start from: 0 without a backup.
        """
        self.restored = True
        metadata_path = os.path.join(self.state_dir, _METADATA)
        if not os.path.exists(metadata_path):
            return 0
        if not model.built:
            raise ValueError(
                f"BackupAndRestore needs a built model to restore into; model {model.name!r} "
                "is not built. Build it first (call it on a batch, or give it a keras.Input)."
            )
        # In the scope fit() trains in (TensorFlow's distribution strategy).
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(os.path.join(self.state_dir, _WEIGHTS))
        with open(metadata_path) as file:
            metadata = json.load(file)
        skip_steps(model, metadata.get("steps_in_epoch", 0))
        return int(metadata["epoch"])

    def on_train_begin(self, logs=None):
        if not self.restored and os.path.exists(os.path.join(self.state_dir, _METADATA)):
            raise TypeError(
                f"marginfit.BackupAndRestore resumes a marginfit.MarginModel, whose fit() "
                f"restores the backup in {self.backup_dir!r}; {type(self.model).__name__} "
                "does not. Wrap the model (MarginModel.wrap), or use "
                "keras.callbacks.BackupAndRestore."
            )
        self.restored = False  # the next fit() restores again

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._steps_in_epoch, self._last_batch = epoch, 0, -1

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution > 1 the batch index jumps.
        self._since_backup += batch - self._last_batch
        self._steps_in_epoch, self._last_batch = batch + 1, batch
        if self.save_freq != "epoch" and self._since_backup >= self.save_freq:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._steps_in_epoch = epoch + 1, 0
        if self.save_freq == "epoch":
            self._save()

    def _save(self):
        self._since_backup = 0
        metadata = {"epoch": self._epoch, "steps_in_epoch": self._steps_in_epoch}
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
        if self.delete_checkpoint and cluster.is_chief():
            shutil.rmtree(self.backup_dir, ignore_errors=True)


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
