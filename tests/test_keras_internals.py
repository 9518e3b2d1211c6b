"""The Keras internals marginfit relies on (marginfit/_keras_internals.py):
each still behaves as marginfit needs, so a Keras upgrade that changes one
fails here, by name; and a missing one disables its feature only."""

import importlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import CE, conv_net, digits

import marginfit
from marginfit import _keras_internals


def test_verify_names_what_changed(monkeypatch):
    _keras_internals.verify()
    owner = next(
        cls for cls in keras.optimizers.Optimizer.__mro__ if "_get_variable_index" in vars(cls)
    )
    monkeypatch.delattr(owner, "_get_variable_index")
    with pytest.raises(RuntimeError, match=r"_get_variable_index.*slot.*keras>=3\.15\.1,<3\.17"):
        _keras_internals.verify()


def test_every_private_name_is_registered():
    """Nothing outside the registry imports `keras.src` (the registry's
    FEATURES say why each one is needed)."""
    package = importlib.util.find_spec("marginfit").submodule_search_locations[0]
    found = subprocess.run(
        ["grep", "-rlnF", "--include=*.py", "keras.src", package], capture_output=True, text=True
    ).stdout.split()
    assert [path for path in found if not path.endswith("_keras_internals.py")] == []
    features = {feature for feature, _, _ in _keras_internals._NAMES.values()}
    features |= set(_keras_internals.ATTRIBUTES.values())
    assert features == set(_keras_internals.FEATURES)


def test_a_missing_internal_disables_its_feature_only():
    """With Keras' MetricsList gone, `import marginfit` works, a plain model
    trains, and a model with a margin fails naming the feature."""
    code = (
        "import keras.src.trainers.compile_utils as utils\n"
        "del utils.MetricsList\n"
        "import keras, marginfit\n"
        "inputs = keras.Input((3,))\n"
        "outputs = keras.layers.Dense(2)(inputs)\n"
        "marginfit.MarginModel(inputs, outputs).compile('sgd', 'mse')\n"
        "try:\n"
        "    marginfit.MarginModel(inputs, outputs, margin=marginfit.LargeMargin('input'))\n"
        "except ImportError as error:\n"
        "    print(str(error).splitlines()[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip().splitlines()[-1]
    assert message.startswith("the metrics of MarginModel's penalty")
    assert "keras.src.trainers.compile_utils.MetricsList" in message


def test_functional_construction_leaves_the_class_subclassable():
    model, _ = conv_net(None)
    assert isinstance(model, _keras_internals.Functional)
    assert not issubclass(marginfit.MarginModel, _keras_internals.Functional)
    assert type(model).__name__ == "MarginModel"


def test_loss_tracker_is_the_loss_log():
    model, _ = conv_net(None)
    model.compile(loss=CE)
    x, y = digits(8)
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    tracker = _keras_internals.loss_tracker(model)
    assert tracker.name == "loss" and tracker in model.metrics
    np.testing.assert_allclose(float(tracker.result()), logs["loss"], rtol=1e-6)


def test_flatten_layers_reaches_nested_layers():
    block = keras.Sequential([keras.layers.Dense(2, name="inner")], name="block")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="outer")(block(inputs)))
    names = [layer.name for layer in _keras_internals.flatten_layers(model)]
    assert {"block", "inner", "outer"} <= set(names)


def test_variable_index_finds_slot_variables():
    optimizer = marginfit.BacktrackingSGD(0.1)
    variables = [keras.Variable(np.zeros(2)), keras.Variable(np.ones(3))]
    optimizer.build(variables)
    assert [_keras_internals.variable_index(optimizer, v) for v in variables] == [0, 1]
    assert optimizer.previous_weights[1].shape == (3,)
