"""One SavedModel directory that serves and that resumes training.

``marginfit.save_model(model, path)`` writes what `model.export(path)`
writes (a SavedModel with the ``serve`` endpoint and the ``serving_default``
signature, read by TF Serving, `tf.saved_model.load` and
`keras.layers.TFSMLayer`) and adds the model's `.keras` archive (config,
weights, compile config, optimizer state) under ``assets.extra/``, which
SavedModel readers leave alone. ``marginfit.load_model(path)`` restores the
trainable model from it.
"""

import os
import shutil
import zipfile

import keras

from marginfit import files

ARCHIVE = os.path.join("assets.extra", "marginfit.keras")
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def _is_saved_model(path):
    return any(os.path.isfile(os.path.join(path, name)) for name in _SAVED_MODEL_FILES)


def save_model(model, path, overwrite=True, input_signature=None):
    """Writes ``model`` to the SavedModel directory ``path``.

    The directory is assembled next to ``path`` and swapped into place only
    once complete (`marginfit.files.replace_directory`), so a failure or a
    killed process leaves any previous model at ``path`` intact; of two
    concurrent writers, the last to finish wins, and neither's files mix.

    Args:
        model: A built `keras.Model` (a `MarginModel` or any other).
        path: Directory to write.
        overwrite: Whether to replace an existing SavedModel at ``path``.
            Other existing files or non-empty directories are never replaced.
        input_signature: Passed to `model.export`: the serving inputs' specs
            (e.g. ``[keras.InputSpec(shape=(None, 128), dtype="int32")]``
            per input, or a structure of `tf.TensorSpec`), where the model's
            own input shapes cannot be traced, as for a keras-hub text model
            of variable length on JAX; None (the default) takes the model's.

    Raises:
        FileExistsError: If ``path`` exists and may not be replaced.
        NotImplementedError: On the PyTorch backend (export it from another).
    """
    if keras.backend.backend() == "torch":
        raise NotImplementedError(
            "save_model cannot export a SavedModel on the PyTorch backend: Keras' "
            "export from PyTorch fails there (a plain keras.Model too). Save a .keras "
            "file with model.save(...), load it under KERAS_BACKEND=tensorflow or jax, "
            "and call save_model there."
        )
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        replaceable = os.path.isdir(path) and (_is_saved_model(path) or not os.listdir(path))
        if not replaceable:
            raise FileExistsError(
                f"{path!r} exists and is not a SavedModel directory; "
                "save_model replaces only its own kind. Choose another path."
            )
        if not overwrite:
            raise FileExistsError(
                f"{path!r} already holds a SavedModel. Pass overwrite=True to replace it."
            )
    staging = files.staging_directory(os.path.dirname(path))
    try:
        _export(model, staging, input_signature)
        os.makedirs(os.path.join(staging, os.path.dirname(ARCHIVE)), exist_ok=True)
        model.save(os.path.join(staging, ARCHIVE))
        files.replace_directory(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export(model, path, input_signature):
    """`model.export` to ``path``; on JAX, a model whose variable input
    length cannot be traced gets an error that says to fix the length."""
    try:
        model.export(path, format="tf_saved_model", verbose=False, input_signature=input_signature)
    except Exception as error:
        if keras.backend.backend() != "jax" or "inconclusive" not in str(error).lower():
            raise
        raise ValueError(
            f"Model {model.name!r} cannot be exported on JAX with inputs of variable "
            "length (its shapes cannot be traced); pass input_signature= with a fixed "
            "length, e.g. input_signature=[{name: keras.InputSpec(shape=(None, 128), "
            "dtype='int32') for name in model.input}] for a keras-hub text model."
        ) from error


def load_model(path, compile=True, safe_mode=True):
    """Restores the trainable model saved by `save_model` (or a `.keras` file).

    Args:
        path: A directory written by `save_model`, or a `.keras` file.
        compile: Whether to restore the compiled loss, metrics and optimizer
            (with its state), so that `fit()` resumes where it stopped.
        safe_mode: As for `keras.models.load_model`; our files load in safe
            mode.

    Returns:
        The model, e.g. a `MarginModel`, with its margin and optimizer.

    Raises:
        ValueError: If ``path`` is missing, is a SavedModel without the
            training archive, or is damaged or not a Keras archive. Nothing
            half-loaded is ever returned.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not _is_saved_model(path):
            raise ValueError(
                f"{path!r} is a directory but not a SavedModel (no "
                "saved_model.pb). Give a directory written by "
                "marginfit.save_model, or a .keras file."
            )
        archive = os.path.join(path, ARCHIVE)
        if not os.path.isfile(archive):
            raise ValueError(
                f"The SavedModel at {path!r} has no {ARCHIVE}: it holds a "
                "serving graph only (as written by model.export), not the "
                "model's training state. Serve it with tf.saved_model.load or "
                "keras.layers.TFSMLayer; to resume training, save with "
                "marginfit.save_model."
            )
    elif os.path.isfile(path):
        archive = path
    else:
        raise ValueError(f"No model at {path!r}: no such file or directory.")
    if not zipfile.is_zipfile(archive):
        raise ValueError(
            f"{archive!r} is not a Keras archive (not a zip file): it is "
            "damaged, truncated or of another format."
        )
    try:
        return keras.models.load_model(archive, compile=compile, safe_mode=safe_mode)
    except Exception as error:
        raise ValueError(
            f"Could not load the model in {archive!r}: {error} The archive is "
            "damaged, or was written with model classes or versions that "
            "this installation does not have."
        ) from error
