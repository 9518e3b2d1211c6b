"""Checks of the data given to `MarginModel.fit()`/`evaluate()`, before
any step runs: each failure names the problem and the fix in its first line.

Arrays are checked whole (one vectorised pass); a `tf.data.Dataset` by its
first batch. Later batches are guarded in the step: labels out of range stop
it (`clear_step_errors` lifts the message to the first line), and a
non-finite loss or gradient skips the update (`marginfit.backend`).
"""

import contextlib
import re
import sys

import keras
import numpy as np

from marginfit.activations import INPUT
from marginfit.labels import LABEL_ERROR_PREFIX


def check_data(model, x, y=None, sample_weight=None, name="fit()"):
    """`check_arrays` on arrays, or on the first batch of a `tf.data.Dataset`
    given as ``x`` (which must be batched); other inputs (generators,
    `PyDataset`) are left to the step."""
    tf = _tensorflow()
    if tf is not None and isinstance(x, tf.data.Dataset):
        for batch in x.take(1):
            as_numpy = lambda t: None if t is None else keras.tree.map_structure(np.asarray, t)  # noqa: E731
            x, y, sample_weight = map(as_numpy, keras.utils.unpack_x_y_sample_weight(batch))
            _check_batched(model, x, y, name)
            check_arrays(model, x, y, sample_weight, f"{name} (first batch of the dataset)")
        return
    check_arrays(model, x, y, sample_weight, name)


def _tensorflow():
    """TensorFlow where it is imported (a `tf.data` input needs it), else
    None: nothing given can be a TensorFlow object then."""
    return sys.modules.get("tensorflow")


def _check_batched(model, x, y, name):
    """Raises `ValueError` where a dataset's first element is one example:
    a scalar label, or inputs of one rank less than the model's."""
    shapes = [np.shape(leaf) for leaf in keras.tree.flatten(x)]
    try:
        expected = [len(tensor.shape) for tensor in model.inputs]
    except (AttributeError, ValueError, TypeError):
        expected = None  # a subclassed model not built yet
    single_example = (y is not None and np.ndim(y) == 0) or (
        expected is not None
        and len(expected) == len(shapes)
        and all(len(shape) == rank - 1 for shape, rank in zip(shapes, expected))
    )
    if single_example:
        labels = "" if y is None else f", y of shape {np.shape(y)}"
        raise ValueError(
            f"{name} received an unbatched tf.data.Dataset: its elements are single "
            f"examples (x of shape {shapes[0] if len(shapes) == 1 else shapes}{labels}). "
            "Batch it first, e.g. `dataset.batch(32)`."
        )


# Messages of the step's label checks: ours (`margin.class_indices`) and
# the sparse cross-entropy kernel's, which may fail first.
_STEP_LABEL_ERRORS = (
    (re.compile(re.escape(LABEL_ERROR_PREFIX) + r"[^\]\n]*"), ""),
    (
        re.compile(
            r"Received a label value of -?\d+ which is outside the valid range of \[0, \d+\)"
        ),
        ". Labels must be class indices 0..classes-1: check the labels or the size of "
        "the output layer.",
    ),
)


@contextlib.contextmanager
def clear_step_errors():
    """Re-raises a failed label check of the step (a
    `tf.errors.InvalidArgumentError` whose first line is "Graph execution
    error") as a `ValueError` whose first line is the check's message."""
    tf = _tensorflow()
    if tf is None:
        yield
        return
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        for pattern, advice in _STEP_LABEL_ERRORS:
            found = pattern.search(error.message or "")
            if found is not None:
                raise ValueError(found.group(0).strip() + advice) from error
        raise


def check_arrays(model, x, y=None, sample_weight=None, name="fit()"):
    """Raises `ValueError` (or `TypeError`) for data the margin cannot use.

    Args:
        model: The `MarginModel` (with a margin).
        x: ``[n, ...]`` inputs, or a list or dict of them (several inputs).
        y: ``[n]``/``[n, 1]`` class indices or ``[n, classes]`` one-hot or
            soft labels.
        sample_weight: Optional ``[n]`` non-negative weights.
        name: The call being checked, for the messages.
    """
    leaves = keras.tree.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    if any(_is_text(leaf) for leaf in leaves):
        raise TypeError(_text_message(model, name))
    if not leaves or not all(_is_array(leaf) for leaf in leaves):
        return
    leaves = [np.asarray(leaf) for leaf in leaves]
    for leaf in leaves:
        if leaf.ndim == 0 or len(leaf) == 0:
            raise ValueError(
                f"{name} received no examples (x has shape {leaf.shape}); give at least one."
            )
    if len({len(leaf) for leaf in leaves}) > 1:
        raise ValueError(
            f"{name} received inputs with different numbers of examples "
            f"({[len(leaf) for leaf in leaves]}); give every input one row per example."
        )
    if INPUT in model.penalty.layers and len(leaves) == 1:
        if not np.issubdtype(leaves[0].dtype, np.floating):
            raise TypeError(
                f"{name} received x of dtype {leaves[0].dtype}, but the margin on 'input' "
                "needs the gradient with respect to the inputs, which integers do not "
                "have. If x holds pixel values, cast it to float (e.g. "
                "x.astype('float32') / 255); if it holds token ids or other indices, "
                "put the margin on the layer that embeds them (e.g. an Embedding "
                "layer) instead of 'input'."
            )
    for leaf in leaves:
        if np.issubdtype(leaf.dtype, np.floating):
            _check_finite(leaf, "x", name)
    examples = len(leaves[0])
    y, sample_weight = model.penalty_head(y), model.penalty_head(sample_weight)
    if y is not None and _is_array(y):
        _check_labels(model, np.asarray(y), examples, name)
    if sample_weight is not None and _is_array(sample_weight):
        _check_weights(np.asarray(sample_weight), examples, name)


def _is_text(value):
    """Whether ``value`` is a string or an array of strings."""
    if isinstance(value, (str, bytes)):
        return True
    if not _is_array(value):
        return False
    value = np.asarray(value)
    if value.dtype.kind == "O":
        first = value.reshape(-1)[:1]
        return bool(len(first)) and isinstance(first[0], (str, bytes))
    return value.dtype.kind in "US"


def _text_message(model, name):
    """The error for text given to a model that takes numbers."""
    try:
        takes = ", ".join(f"{t.name} ({t.dtype})" for t in model.inputs)
    except (AttributeError, ValueError, TypeError):
        takes = "tensors"
    return (
        f"{name} received text (strings) as x, but model {model.name!r} takes "
        f"{takes}: map a preprocessor over the data first, e.g. a keras-hub "
        "task's `preprocessor` (`tf.data.Dataset.from_tensor_slices((x, y))"
        ".batch(32).map(preprocessor)`), which `MarginModel.wrap` does not run "
        "(see the guide 'Models from keras-hub')."
    )


def _is_array(value):
    return isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__array__")
    )


def _check_finite(values, what, name):
    finite = np.isfinite(values)
    if not finite.all():
        bad = ~finite.reshape(len(values), -1).all(axis=-1)
        raise ValueError(
            f"{name} received {what} with {int((~finite).sum())} non-finite values (NaN or "
            f"inf) in {int(bad.sum())} examples, the first at index {int(np.argmax(bad))}. "
            "Remove or impute them: one such example would corrupt every weight."
        )


def _classes(model):
    """Number of model outputs, or None where not known yet (subclassed)."""
    try:
        return model.outputs[model.penalty_head.index].shape[-1]
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _check_labels(model, y, examples, name):
    classes = _classes(model)
    if len(y) != examples:
        raise ValueError(
            f"{name} received {len(y)} labels for {examples} examples; give one label per example."
        )
    if np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating):
            _check_finite(y, "y", name)
    else:
        raise TypeError(
            f"{name} received labels of dtype {y.dtype}; give integer class indices or "
            "float one-hot labels."
        )
    one_hot = y.ndim == 2 and y.shape[-1] != 1
    if one_hot:
        if classes is not None and y.shape[-1] != classes:
            raise ValueError(
                f"{name} received one-hot (or soft) labels of width {y.shape[-1]}, but the "
                f"model has {classes} outputs. Give labels of width {classes}, or class "
                "indices."
            )
        return
    if y.ndim > 2:
        raise ValueError(
            f"{name} received labels of shape {y.shape}; give [n] class indices or "
            "[n, classes] one-hot labels."
        )
    flat = y.reshape(-1)
    if np.issubdtype(flat.dtype, np.floating) and not np.all(flat == np.round(flat)):
        index = int(np.argmax(flat != np.round(flat)))
        raise ValueError(
            f"{name} received non-integer class labels (e.g. {flat[index]} at index "
            f"{index}): labels would be truncated to integers. Give integer class "
            "indices 0..classes-1."
        )
    if classes is not None:
        outside = (flat < 0) | (flat >= classes)
        if outside.any():
            index = int(np.argmax(outside))
            raise ValueError(
                f"{name} received labels outside 0..{classes - 1} (e.g. {flat[index]:g} at "
                f"index {index}); the model has {classes} outputs. Fix the labels or the "
                "size of the output layer."
            )


def _check_weights(weights, examples, name):
    if weights.ndim > 2 or len(weights) != examples or weights.size != examples:
        raise ValueError(
            f"{name} received sample_weight of shape {weights.shape} for {examples} "
            "examples; give one weight per example, shape [n]."
        )
    _check_finite(weights.astype("float64"), "sample_weight", name)
    if (weights < 0).any():
        index = int(np.argmax(weights.reshape(-1) < 0))
        raise ValueError(
            f"{name} received negative sample weights (e.g. at index {index}); weights "
            "must be >= 0."
        )
