"""`Penalties`: the margin and the input-gradient penalty in one step, against
the naive margin (`reference.py`) and the input gradient's float64 closed
form (`test_input_gradient.py`) on a linear model; the weights' step is the
sum of each penalty's own; one shared forward pass; config and saving."""

import keras
import numpy as np
import pytest
import reference
from helpers import assert_config_round_trip, assert_model_file_round_trip
from nets import float64
from test_input_gradient import data, penalty_float64

import marginfit
from marginfit import LargeMargin

WEIGHT = 2.5
GAMMA = 3.0


def margin():
    return LargeMargin(["input"], gamma=GAMMA, alpha=2.0, competitors="top", balance=0.0)


def linear_model(penalty):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    logits = keras.layers.Dense(10, name="logits")(inputs)
    return marginfit.MarginModel(inputs, logits, penalty=penalty)


def both():
    return [margin(), marginfit.InputGradientPenalty(weight=WEIGHT)]


def test_each_term_is_its_reference_and_the_loss_their_weighted_sum():
    model = linear_model(both())
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    logs = model.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    kernel, bias = (w.astype("float64") for w in model.get_weights())

    def taps(points, training=False):  # the reference's [outputs, *hidden]
        return [model(points, training=training)]

    config = model.margin.get_config()
    expected_margin, _ = reference.margin_loss(
        taps, x.astype("float32"), y, gamma=config["gamma"], alpha=config["alpha"],
        layers=["input"], top_k=1,
    )  # fmt: skip
    expected_gradient = penalty_float64(kernel, bias, x, y)
    np.testing.assert_allclose(logs["margin_loss"], float(expected_margin), rtol=1e-5)
    np.testing.assert_allclose(logs["input_gradient_loss"], expected_gradient, rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], logs["ce_loss"] + logs["margin_loss"] + WEIGHT * expected_gradient, rtol=1e-5
    )
    (nearest,) = reference.boundary_distances(
        taps, x.astype("float32"), y, layers=["input"], competitors=1
    )
    np.testing.assert_allclose(logs["distance_input"], nearest.mean(), rtol=1e-4, atol=1e-6)
    assert {"dead_rate", "distance_input"} <= logs.keys()


def sgd_change(penalty, x, y):
    """The weights' change in one float64 SGD step, and the step's logs."""
    model = linear_model(penalty)
    model.compile(keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [w - w0 for w, w0 in zip(model.get_weights(), before)], history.history


def test_one_step_moves_the_weights_by_the_sum_of_each_penalty_s_step():
    """SGD is linear in the gradient: the composed step's change is each
    penalty's change alone, less the cross-entropy's counted twice."""
    with float64():
        x, y = data(8)
        together, logs = sgd_change(both(), x, y)
        margin_alone, margin_logs = sgd_change(margin(), x, y)
        gradient_alone, gradient_logs = sgd_change(
            marginfit.InputGradientPenalty(weight=WEIGHT), x, y
        )
        plain, _ = sgd_change(None, x, y)
    for change, *parts in zip(together, margin_alone, gradient_alone, plain):
        expected = parts[0] + parts[1] - parts[2]
        np.testing.assert_allclose(change, expected, rtol=0, atol=1e-12)
    assert min(np.abs(m - p).max() for m, p in zip(margin_alone, plain)) > 1e-4
    assert min(np.abs(g - p).max() for g, p in zip(gradient_alone, plain)) > 1e-4
    assert logs["margin_loss"] == pytest.approx(margin_logs["margin_loss"], rel=1e-12)
    assert logs["input_gradient_loss"] == pytest.approx(
        gradient_logs["input_gradient_loss"], rel=1e-12
    )


def test_the_penalties_share_one_forward_pass():
    calls = []

    class Counting(keras.layers.Layer):
        def call(self, inputs):
            calls.append(1)
            return inputs

    inputs = keras.Input((64,))
    logits = keras.layers.Dense(10)(Counting()(inputs))
    model = marginfit.MarginModel(inputs, logits, penalty=both())
    model.compile(loss=None, run_eagerly=True)
    x, y = data(8)
    calls.clear()
    model.evaluate(x, y, batch_size=8, verbose=0)
    shared = len(calls)
    calls.clear()
    alone = marginfit.MarginModel(inputs, logits, penalty=margin())
    alone.compile(loss=None, run_eagerly=True)
    alone.evaluate(x, y, batch_size=8, verbose=0)
    assert shared == len(calls) >= 1


def test_a_list_saves_loads_and_round_trips_its_config(tmp_path):
    penalties = marginfit.Penalties(both())
    assert_config_round_trip(penalties)
    model = linear_model(both())
    assert isinstance(model.penalty, marginfit.Penalties)
    assert model.margin == margin()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, _ = data(4)
    restored = assert_model_file_round_trip(model, str(tmp_path / "model.keras"), x)
    assert restored.penalty == model.penalty


@pytest.mark.parametrize(
    "penalties, message",
    [
        ([], "`Penalties` is empty"),
        ([margin(), margin()], r"two penalties named \['margin'\]"),
        ([margin(), None], "received None"),
        ([margin(), "margin"], "must be a `marginfit.Penalty`"),
    ],
)
def test_bad_lists_are_refused_with_the_fix(penalties, message):
    with pytest.raises((ValueError, TypeError), match=message):
        marginfit.Penalties(penalties)
