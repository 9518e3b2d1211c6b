"""Bundled data: scikit-learn's 8x8 digits, which need no network."""

import numpy as np


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
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    images = (data.images / 16.0).astype("float32")[..., None]
    labels = data.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return (x_train, y_train), (x_test, y_test)
