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


def load_digits28(test_fraction=0.25, seed=0, size=20):
    """The bundled digits as 28x28 images: each 8x8 digit resized to
    ``size`` x ``size`` (bilinear) and placed at a random position.

    A larger, harder version of `load_digits` (the same 1797 real digits,
    MNIST's image size, translated) that needs no network.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images as
        ``[n, 28, 28, 1]`` float32 in [0, 1], labels as ``[n]`` int64.
    """
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits as sklearn_digits

    if not 8 <= size <= 28:
        raise ValueError(f"`size` must be in 8..28 (pixels); received {size!r}.")
    data = sklearn_digits()
    rng = np.random.default_rng(seed)
    images = np.zeros((len(data.images), 28, 28), "float32")
    offsets = rng.integers(0, 28 - size + 1, size=(len(images), 2))
    for image, digit, (row, column) in zip(images, data.images / 16.0, offsets):
        resized = zoom(digit, size / 8, order=1)
        image[row : row + size, column : column + size] = np.clip(resized, 0.0, 1.0)
    return split(images[..., None], data.target.astype("int64"), test_fraction, seed)


def load_npz(path, test_fraction=0.25, seed=0):
    """Examples and integer labels from a ``.npz`` file: arrays ``x_train``,
    ``y_train``, ``x_test``, ``y_test`` as they are, or ``x`` and ``y``
    split like `load_digits`.

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
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        return tuple(
            _checked(arrays[f"x_{part}"], arrays[f"y_{part}"]) for part in ("train", "test")
        )
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(
            f"{path!r} holds arrays {sorted(arrays)}; it needs `x` (examples) "
            "and `y` (integer labels), or x_train, y_train, x_test and y_test."
        )
    return split(*_checked(arrays["x"], arrays["y"]), test_fraction, seed)


def _checked(x, y):
    """``(x, y)`` as float32 ``[n, features]``/``[n, h, w, c]`` and int64 ``[n]``."""
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
    return x.astype("float32"), y.astype("int64")


KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10")


def load_keras_dataset(name):
    """MNIST, Fashion-MNIST or CIFAR-10 through `keras.datasets` (downloads
    on first use), scaled to [0, 1], with a channel axis and int64 labels."""
    import keras

    if name not in KERAS_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; use one of {list(KERAS_DATASETS)}.")
    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as error:
        raise RuntimeError(
            f"Could not download {name!r} ({error}). It needs network access; "
            "use the bundled digits (the default) or a .npz file instead."
        ) from error
    return tuple(
        _checked(x.astype("float32") / 255.0, y.reshape(-1))
        for x, y in ((x_train, y_train), (x_test, y_test))
    )


def load(source, seed=0):
    """``((x_train, y_train), (x_test, y_test))`` from ``source``: ``"digits"``
    or ``"digits28"`` (bundled), a ``.npz`` path (see `load_npz`) or one of
    `KERAS_DATASETS`.
    ``seed`` seeds the split where one is made."""
    if source == "digits":
        return load_digits(seed=seed)
    if source == "digits28":
        return load_digits28(seed=seed)
    if source in KERAS_DATASETS:
        return load_keras_dataset(source)
    if str(source).endswith(".npz"):
        return load_npz(source, seed=seed)
    raise ValueError(
        f"Data {source!r} is neither 'digits', 'digits28', a .npz file nor one of "
        f"{list(KERAS_DATASETS)}."
    )


def num_classes(*labels):
    """Number of classes of integer label arrays: their largest label + 1."""
    return int(max(int(np.max(y)) for y in labels)) + 1


def add_label_noise(labels, rate, num_classes, seed=0):
    """Symmetric label noise: a ``rate`` share of the labels (exactly
    ``round(rate * n)``, chosen at random) replaced by a uniformly drawn
    *different* class.

    Returns:
        ``[n]`` int64 noisy labels; ``labels`` is not modified.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"The label-noise rate must be in [0, 1); received {rate!r}.")
    rng = np.random.default_rng(seed)
    noisy = np.array(labels, dtype="int64")
    flipped = rng.choice(len(noisy), size=int(round(rate * len(noisy))), replace=False)
    shift = rng.integers(1, num_classes, size=len(flipped))
    noisy[flipped] = (noisy[flipped] + shift) % num_classes
    return noisy
