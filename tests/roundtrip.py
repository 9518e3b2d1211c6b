"""One helper that round-trips any public marginfit object, as Keras'
`run_layer_test` does for layers: through `get_config`/`from_config`, through
Keras serialization, and (for models) through a `.keras` file."""

import copy
import json

import keras
import numpy as np


def normalized(config):
    """A config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config))


def assert_same_config(actual, expected):
    actual, expected = normalized(actual), normalized(expected)
    different = sorted(
        key for key in set(actual) | set(expected)
        if actual.get(key) != expected.get(key)
    )
    assert not different, {
        key: (actual.get(key), expected.get(key)) for key in different
    }


def assert_config_round_trip(obj):
    """``obj`` survives get_config/from_config and Keras (de)serialization
    with an identical config, and without `custom_objects`."""
    config = obj.get_config()
    # Keras' Model.from_config consumes the dict it is given.
    clone = type(obj).from_config(copy.deepcopy(config))
    assert type(clone) is type(obj)
    assert_same_config(clone.get_config(), config)
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(obj)
    )
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
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    return loaded
