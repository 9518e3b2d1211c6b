"""The small model and data of the tests, without TensorFlow: the
backend workers build them on any Keras backend."""

import contextlib

import keras
import numpy as np
from sklearn.datasets import load_digits

import marginfit


def digits(count=24, offset=0, dtype="float32"):
    """``count`` digits as ``[count, 8, 8, 1]`` floats in [0, 1], int labels."""
    data = load_digits()
    x = (data.images[offset : offset + count] / 16.0).astype(dtype)
    return x[..., None], data.target[offset : offset + count].astype("int64")


def conv_net(
    margin=None,
    seed=0,
    output="logits",
    batchnorm=False,
    regularizer=None,
    activation="tanh",
    **kwargs,
):
    """A small conv net on 8x8x1 digits as a `MarginModel`, and a plain
    Keras model on the same layers returning ``[outputs, conv, dense]``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="pixels")
    conv = keras.layers.Conv2D(4, 3, activation=activation, name="conv")(inputs)
    hidden = keras.layers.Flatten(name="flatten")(conv)
    if batchnorm:
        hidden = keras.layers.BatchNormalization(name="batchnorm")(hidden)
    dense = keras.layers.Dense(
        16, activation=activation, kernel_regularizer=regularizer, name="dense"
    )(hidden)
    outputs = keras.layers.Dense(
        10, activation="softmax" if output == "probabilities" else None, name="logits"
    )(dense)
    model = marginfit.MarginModel(inputs, outputs, margin=margin, output=output, **kwargs)
    taps = keras.Model(inputs, [outputs, conv, dense])
    return model, taps


@contextlib.contextmanager
def float64():
    """Models, losses and data built inside are float64 (Keras' floatx and
    dtype policy); what was set before is restored after. On JAX,
    `jax_enable_x64` must be set at start-up."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


# ------------------------------------------------- the margin of conv_net

LAYERS = ["input", "conv", "dense"]
# Margins of the size of this untrained net's distances, so that for every
# norm some examples are clipped, some penalised and some beyond the margin.
GAMMA = {1: [0.8, 0.6, 0.4], 2: [0.2, 0.15, 0.15], np.inf: [0.04, 0.02, 0.04]}
ALPHA = 2.0


def margin_for(norm, **options):
    """A margin on conv_net's input, conv and dense layers, sized to its
    untrained distances for ``norm``; the top-scoring competitors and no
    class-balance term (what the reference computes) unless ``options`` say
    otherwise."""
    options.setdefault("competitors", "top")
    options.setdefault("balance", 0.0)
    return marginfit.LargeMargin(LAYERS, gamma=GAMMA[norm], norm=norm, alpha=ALPHA, **options)


DISTRIBUTION_MARGINS = {
    "defaults": marginfit.LargeMargin(LAYERS),
    "defaults, exact": marginfit.LargeMargin(LAYERS, approximate=False),
    "authors": marginfit.LargeMargin(LAYERS, competitors="top", balance=0.0),
}
"""The margins of the distribution and resume tests: the library's defaults
(sampled competitors and the class-balance term, which depend on the
global batch), the same with exact second-order gradients, and the
authors' loss (top-scoring competitors, no balance term)."""


STEP_GRID = [
    (True, 2, "sum"),
    (True, np.inf, "sum"),
    (False, 2, "sum"),
    (False, np.inf, "sum"),
    (True, 2, "max"),
    (False, 2, "max"),
    (False, np.inf, "max"),
]
"""``(approximate, norm, aggregation)`` of the one-SGD-step cases checked
against the reference (`test_model.py`) and across backends."""
