"""Small models, data, the reference margin and round-trip checks shared by
the tests."""

import contextlib
import copy
import importlib.util
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf
from nets import (  # noqa: F401 (shared with the tests)
    DISTRIBUTION_MARGINS,
    LAYERS,
    conv_net,
    digits,
    margin_for,
)

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------- the margin of conv_net


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


def assert_logs_match_reference(logs, expected_loss, margin, taps, x, y, sample_weight=None):
    """The loss is the reference's; the distances are the logit-space
    first-order distances to the top competitor's boundary, whatever the
    loss's space; the violation rate (logit space only) compares them with
    gamma over the layer weight."""
    np.testing.assert_allclose(logs["margin_loss"], float(expected_loss), rtol=1e-5)
    nearest = reference.boundary_distances(
        taps, x, y, layers=LAYERS, norm=margin.norm, competitors=1
    )
    for name, distances in zip(LAYERS, nearest):
        np.testing.assert_allclose(logs[f"distance_{name}"], distances.mean(), rtol=1e-5, atol=1e-7)
    if margin.space != "logits":
        assert "violation_rate" not in logs
        return
    # An example violates the margin when any layer's distance is below gamma.
    layer_weights = margin.layer_weights or [1.0] * len(LAYERS)
    violated = np.any([d < g / w for d, g, w in zip(nearest, margin.gamma, layer_weights)], axis=0)
    weights = np.ones(len(violated)) if sample_weight is None else sample_weight
    expected_rate = np.sum(weights * violated) / np.sum(weights)
    np.testing.assert_allclose(logs["violation_rate"], expected_rate, rtol=1e-6)


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


def skip_without(backend):
    """Skips the test where the Keras ``backend``'s framework is not installed."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install -e .[{backend}])")


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
