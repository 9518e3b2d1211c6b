"""Small models and data shared by the tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
from sklearn.datasets import load_digits

import marginfit

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits(count=24, offset=0):
    """``count`` digits as ``[count, 8, 8, 1]`` float32 in [0, 1], int labels."""
    data = load_digits()
    x = (data.images[offset : offset + count] / 16.0).astype("float32")
    return x[..., None], data.target[offset : offset + count].astype("int64")


def conv_net(
    margin=None, seed=0, output="logits", batchnorm=False, regularizer=None, **kwargs
):
    """A small conv net on 8x8x1 digits as a `MarginModel`, and a plain
    Keras model on the same layers returning ``[outputs, conv, dense]``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="pixels")
    conv = keras.layers.Conv2D(4, 3, activation="tanh", name="conv")(inputs)
    hidden = keras.layers.Flatten(name="flatten")(conv)
    if batchnorm:
        hidden = keras.layers.BatchNormalization(name="batchnorm")(hidden)
    dense = keras.layers.Dense(
        16, activation="tanh", kernel_regularizer=regularizer, name="dense"
    )(hidden)
    outputs = keras.layers.Dense(
        10, activation="softmax" if output == "probabilities" else None, name="logits"
    )(dense)
    model = marginfit.MarginModel(
        inputs, outputs, margin=margin, output=output, **kwargs
    )
    taps = keras.Model(inputs, [outputs, conv, dense])
    return model, taps
