"""Small models, data, the reference margin and round-trip checks shared by
the tests."""

import contextlib
import copy
import json
import subprocess
import sys

import keras
import numpy as np
import reference
import tensorflow as tf
from sklearn.datasets import load_digits

import marginfit

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits(count=24, offset=0):
    """``count`` digits as ``[count, 8, 8, 1]`` float32 in [0, 1], int labels."""
    data = load_digits()
    x = (data.images[offset : offset + count] / 16.0).astype("float32")
    return x[..., None], data.target[offset : offset + count].astype("int64")


def conv_net(margin=None, seed=0, output="logits", batchnorm=False, regularizer=None, **kwargs):
    """A small conv net on 8x8x1 digits as a `MarginModel`, and a plain
    Keras model on the same layers returning ``[outputs, conv, dense]``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="pixels")
    conv = keras.layers.Conv2D(4, 3, activation="tanh", name="conv")(inputs)
    hidden = keras.layers.Flatten(name="flatten")(conv)
    if batchnorm:
        hidden = keras.layers.BatchNormalization(name="batchnorm")(hidden)
    dense = keras.layers.Dense(16, activation="tanh", kernel_regularizer=regularizer, name="dense")(
        hidden
    )
    outputs = keras.layers.Dense(
        10, activation="softmax" if output == "probabilities" else None, name="logits"
    )(dense)
    model = marginfit.MarginModel(inputs, outputs, margin=margin, output=output, **kwargs)
    taps = keras.Model(inputs, [outputs, conv, dense])
    return model, taps


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


def reference_loss(taps, x, y, margin, training=False, sample_weight=None):
    config = margin.get_config()
    return reference.margin_loss(
        taps,
        x,
        y,
        gamma=config["gamma"],
        alpha=config["alpha"],
        aggregation=config["aggregation"],
        sample_weight=sample_weight,
        layers=LAYERS,
        norm=margin.norm,
        top_k=config["top_k"],
        space=config["space"],
        epsilon=config["epsilon"],
        layer_weights=config["layer_weights"],
        approximate=config["approximate"],
        training=training,
    )


def reference_gradients(model, taps, x, y, margin, ce_weight=1.0):
    """Gradients of the reference margin loss (+ cross-entropy) w.r.t. the
    model's trainable weights."""
    with tf.GradientTape() as tape:
        total = margin.weight * reference_loss(taps, x, y, margin)[0]
        if ce_weight:
            total += ce_weight * CE(y, taps(x)[0])
    return [g.numpy() for g in tape.gradient(total, model.trainable_weights)]


# ------------------------------------------------------------ round trips
# One helper that round-trips any public marginfit object, as Keras'
# `run_layer_test` does for layers: through get_config/from_config, Keras
# serialization, and (for models) a .keras file.


def normalized(config):
    """A config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config))


def assert_same_config(actual, expected):
    actual, expected = normalized(actual), normalized(expected)
    different = sorted(
        key for key in set(actual) | set(expected) if actual.get(key) != expected.get(key)
    )
    assert not different, {key: (actual.get(key), expected.get(key)) for key in different}


def assert_config_round_trip(obj):
    """``obj`` survives get_config/from_config and Keras (de)serialization
    with an identical config, and without `custom_objects`."""
    config = obj.get_config()
    # Keras' Model.from_config consumes the dict it is given.
    clone = type(obj).from_config(copy.deepcopy(config))
    assert type(clone) is type(obj)
    assert_same_config(clone.get_config(), config)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(revived) is type(obj)
    assert_same_config(revived.get_config(), config)
    return revived


def assert_model_file_round_trip(model, path, x):
    """``model`` saved to ``path`` reloads (safe mode, no custom objects) as
    the same class with the same config and the same predictions on ``x``."""
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert_same_config(loaded.get_config(), model.get_config())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    return loaded


# ------------------------------------------------------------- processes


@contextlib.contextmanager
def processes(commands, **options):
    """Starts one `subprocess.Popen` per command (a list of arguments run
    with this Python); yields them, and kills and reaps every one that is
    still running on the way out, also on failure."""
    started = []
    try:
        for command in commands:
            started.append(subprocess.Popen([sys.executable, *command], **options))
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
        for process in started:
            process.wait(timeout=60)


def wait_all(started, timeout):
    """Waits for every process; returns their ``(returncode, stdout,
    stderr)``."""
    results = []
    for process in started:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append((process.returncode, stdout or "", stderr or ""))
    return results
