"""Labels as the steps take them: class indices or one-hot rows, and the
messages of the step's label checks (the same on every backend)."""

LABEL_ERROR_PREFIX = "Labels must be class indices"
"""Start of the message of the step's label check (`backend.class_indices`)."""


def is_one_hot(shape, num_classes):
    """Whether labels of ``shape`` are ``[batch, num_classes]`` one-hot (or
    soft) rows rather than class indices; False for an unknown rank."""
    dims = getattr(shape, "dims", shape)  # a TensorShape of unknown rank has None
    return dims is not None and len(dims) == 2 and dims[-1] == num_classes and num_classes > 1


def negative_label_message():
    """The step's label check where a batch holds a negative label."""
    return f"{LABEL_ERROR_PREFIX} >= 0, but a batch holds a negative label. Check the labels."


def large_label_message(num_classes):
    """The step's label check where a batch holds a label >= ``num_classes``."""
    return (
        f"{LABEL_ERROR_PREFIX} < {num_classes} (the number of model outputs), but a batch "
        "holds a larger one. Check the labels or the size of the output layer."
    )
