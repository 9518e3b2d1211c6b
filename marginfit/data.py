"""Data: scikit-learn's bundled 8x8 digits (no network), and `.npz` files."""

import numpy as np


def split(x, y, test_fraction=0.25, seed=0):
    """``((x_train, y_train), (x_test, y_test))``, stratified by class."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_test, y_test)


def load_digits(test_fraction=0.25, seed=0):
    """The 1797 8x8 grey digits of scikit-learn, split into train and test.

    Args:
        test_fraction: Share of the examples held out for testing, stratified
            by class.
        seed: Seed of the split.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images as
        ``[n, 8, 8, 1]`` float32 in [0, 1], labels as ``[n]`` int64 in 0..9.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = (data.images / 16.0).astype("float32")[..., None]
    return split(images, data.target.astype("int64"), test_fraction, seed)


def load_npz(path, test_fraction=0.25, seed=0):
    """Examples and integer labels from a ``.npz`` file with arrays ``x``
    and ``y``, split like `load_digits`.

    ``x`` is ``[n, features]``, ``[n, height, width]`` (a channel axis is
    added) or ``[n, height, width, channels]``; ``y`` holds ``n`` integer
    labels 0..classes-1.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, x as float32, y as int64.
    """
    try:
        with np.load(path, allow_pickle=False) as arrays:
            arrays = {name: arrays[name] for name in arrays.files}
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"Could not read {path!r} as a .npz file: {error}") from error
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(
            f"{path!r} holds arrays {sorted(arrays)}; it needs `x` (examples) "
            "and `y` (integer labels)."
        )
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim not in (2, 4) or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"Expected x of shape [n, features] or [n, height, width(, channels)] "
            f"and y of shape [n]; received x {x.shape} and y {y.shape}."
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(
            "`y` must hold integer class labels 0..classes-1 (not one-hot); "
            f"received dtype {y.dtype}, minimum {y.min()}."
        )
    return split(x.astype("float32"), y.astype("int64"), test_fraction, seed)
