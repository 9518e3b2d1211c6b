"""Ways to build a MarginModel, and the errors of a bad one."""

import re

import keras
import numpy as np
import pytest
import reference
from helpers import CE, assert_config_round_trip, assert_model_file_round_trip, conv_net, digits

from marginfit import LargeMargin, MarginModel

# The authors' loss (top-scoring competitors, no class-balance term), which
# the references compute.
MARGIN = LargeMargin(
    ["input", "hidden"], gamma=0.2, alpha=2.0, top_k=2, competitors="top", balance=0.0
)


def mlp_layers(seed=0):
    keras.utils.set_random_seed(seed)
    return (
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(12, activation="tanh", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    )


def expected_margin_loss(taps, x, y):
    loss, _ = reference.margin_loss(
        taps, x, y, gamma=0.2, alpha=2.0, layers=["input", "hidden"], top_k=2
    )
    return float(loss)


@keras.saving.register_keras_serializable(package="marginfit_tests")
class SubclassedNet(MarginModel):
    """The documented pattern: one forward pass serving `call` and the margin."""

    def __init__(self, units=12, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.flatten, self.hidden, self.logits = mlp_layers()

    def call(self, inputs, training=None, return_activations=False):
        hidden = self.hidden(self.flatten(inputs))
        logits = self.logits(hidden)
        return (logits, {"hidden": hidden}) if return_activations else logits

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_functional_wrapped_sequential_and_subclassed_models_agree():
    x, y = digits(12)
    losses = []
    # Functional.
    flatten, hidden, logits = mlp_layers()
    inputs = keras.Input((8, 8, 1))
    h = hidden(flatten(inputs))
    functional = MarginModel(inputs, logits(h), margin=MARGIN)
    taps = keras.Model(inputs, [functional.outputs[0], h])
    # Wrapped Sequential, sharing its layers with the wrapped model.
    sequential = keras.Sequential([keras.Input((8, 8, 1)), *mlp_layers()])
    wrapped = MarginModel.wrap(sequential, margin=MARGIN)
    assert wrapped.get_layer("hidden") is sequential.get_layer("hidden")
    # Subclassed.
    subclassed = SubclassedNet(margin=MARGIN)
    for model in (functional, wrapped, subclassed):
        model.compile(loss=CE)
        losses.append(model.evaluate(x, y, return_dict=True, verbose=0))
    expected = expected_margin_loss(taps, x, y)
    for logs in losses:
        np.testing.assert_allclose(logs["margin_loss"], expected, rtol=1e-5)
        assert set(logs) >= {"distance_input", "distance_hidden", "ce_loss"}


def test_subclassed_model_trains_and_round_trips(tmp_path):
    x, y = digits(16)
    model = SubclassedNet(units=12, margin=MARGIN)
    model.compile("adam", loss=CE)
    model.fit(x, y, epochs=1, verbose=0)
    loaded = assert_model_file_round_trip(model, tmp_path / "net.keras", x)
    assert loaded.margin == MARGIN


def test_functional_model_round_trips_with_its_margin(tmp_path):
    margin = LargeMargin(
        ["input", "conv"], gamma=[1.0, 2.0], norm="inf", top_k=3, approximate=False
    )
    model, _ = conv_net(margin, output="probabilities")
    model.compile("adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = digits(16)
    model.fit(x, y, epochs=1, verbose=0)
    loaded = assert_model_file_round_trip(model, tmp_path / "model.keras", x)
    assert loaded.margin == margin and loaded.output_kind == "probabilities"
    np.testing.assert_allclose(
        loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-6
    )


def test_public_objects_round_trip_through_their_config():
    assert_config_round_trip(MARGIN)
    model, _ = conv_net(MARGIN.__class__(["conv"], gamma=3.0))
    revived = assert_config_round_trip(model)
    assert revived.margin == model.margin


def test_sampled_competitors_round_trip_and_train_after_reloading(tmp_path):
    model, _ = conv_net(LargeMargin(["input", "conv"], gamma=0.2, competitors="sampled"))
    model.compile("adam", loss=CE)
    x, y = digits(16)
    model.fit(x, y, batch_size=8, verbose=0)
    loaded = assert_model_file_round_trip(model, tmp_path / "sampled.keras", x)
    assert loaded.margin.competitors == "sampled"
    # Evaluation draws with a fixed seed: the same logs each time.
    first, second = (loaded.evaluate(x, y, return_dict=True, verbose=0) for _ in range(2))
    assert first == second
    loaded.fit(x, y, batch_size=8, verbose=0)


def test_plain_model_without_margin_matches_keras():
    model, taps = conv_net(margin=None)
    model.compile(keras.optimizers.SGD(0.1), loss=CE)
    x, y = digits(8)
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    assert set(logs) == {"loss"}
    np.testing.assert_allclose(logs["loss"], CE(y, taps(x)[0]), rtol=1e-6)


def bad_model(**kwargs):
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(5, name="hidden")(keras.layers.Flatten()(inputs))
    return inputs, hidden


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: conv_net(LargeMargin(["input", "dens"])),
            "Margin layer(s) ['dens'] not found in model",
        ),
        (
            lambda: conv_net(LargeMargin(["input"], top_k=10)),
            "`top_k=10` exceeds the 9 competitors of a 10-class output. Use top_k <= 9",
        ),
        (
            lambda: MarginModel(*bad_model(), output="softmax"),
            "output='logits' or output='probabilities'",
        ),
        (
            lambda: MarginModel(*bad_model(), margin={"gamma": 1.0}),
            "must be a `marginfit.LargeMargin`",
        ),
    ],
)
def test_construction_errors_name_the_fix(build, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        build()


def test_wrong_layer_name_lists_the_valid_names():
    with pytest.raises(ValueError) as error:
        conv_net(LargeMargin(["dens"]))
    for name in ("input", "conv", "flatten", "dense", "logits"):
        assert repr(name) in str(error.value)


def test_ambiguous_outputs_and_flat_outputs_are_rejected():
    inputs = keras.Input((4,))
    first = keras.layers.Dense(3, name="first")(inputs)
    second = keras.layers.Dense(3, name="second")(inputs)
    with pytest.raises(ValueError, match=re.escape("penalty_output='first'")):
        MarginModel(inputs, [first, second], margin=LargeMargin(["input"]))
    with pytest.raises(ValueError, match="names no output"):
        MarginModel(inputs, [first, second], margin=LargeMargin(["input"]), penalty_output="x")
    named = MarginModel(inputs, [first, second], margin=MARGIN_ON_INPUT, penalty_output="second")
    assert named.penalty_head.index == 1
    regression = keras.layers.Dense(1)(inputs)  # not a classifier: the choice is clear
    assert MarginModel(inputs, [regression, first], margin=MARGIN_ON_INPUT).penalty_head.index == 1
    single = keras.layers.Dense(1)(inputs)
    with pytest.raises(ValueError, match=re.escape("at least 2 classes")):
        MarginModel(inputs, single, margin=LargeMargin(["input"]))


MARGIN_ON_INPUT = LargeMargin(["input"])


def test_wrap_rejects_a_subclassed_model():
    class Plain(keras.Model):
        def call(self, inputs):
            return inputs

    with pytest.raises(ValueError, match="let `call` accept `return_activations`"):
        MarginModel.wrap(Plain(), margin=MARGIN)


def test_subclassed_call_without_activations_is_rejected_at_construction():
    class NoActivations(MarginModel):
        def call(self, inputs):
            return inputs

    NoActivations(margin=LargeMargin(["input"]))  # the input needs no help
    with pytest.raises(TypeError, match=re.escape("Add `return_activations=False`")):
        NoActivations(margin=LargeMargin(["input", "hidden"]))


def test_subclassed_model_missing_an_activation_is_named():
    model = SubclassedNet(margin=LargeMargin(["input", "pooled"]))
    model.compile(loss=CE)
    x, y = digits(4)
    with pytest.raises(ValueError, match=re.escape("Margin layer(s) ['pooled']")):
        model.evaluate(x, y, verbose=0)


def test_missing_labels_are_named():
    model, _ = conv_net(LargeMargin(["input"]))
    model.compile(loss=None)
    x, _ = digits(4)
    with pytest.raises(ValueError, match="MarginModel needs labels"):
        model.evaluate(x, verbose=0)
