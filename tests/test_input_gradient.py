"""`InputGradientPenalty` (double backpropagation) against a float64 numpy
closed form on a linear model, its weights' gradient (second order)
against finite differences of that formula, and its config; the same
numbers on JAX and PyTorch are in `test_backends.py`."""

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip, assert_model_file_round_trip, digits

import marginfit

WEIGHT = 2.5


def linear_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    model = marginfit.MarginModel(
        inputs,
        keras.layers.Dense(10)(inputs),
        penalty=marginfit.InputGradientPenalty(weight=WEIGHT),
    )
    return model


def penalty_float64(kernel, bias, x, y, sample_weight=None):
    """The penalty of a linear softmax classifier: each example's input
    gradient of the cross-entropy is ``W (softmax(z) - onehot(y))``."""
    z = x @ kernel + bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    per_example = np.sum(((p - np.eye(10)[y]) @ kernel.T) ** 2, axis=1)
    if sample_weight is not None:
        per_example = per_example * sample_weight
    return per_example.mean()


def data(count=16):
    x, y = digits(count)
    return x.reshape(count, 64).astype("float64"), y


def test_the_logged_penalty_is_the_closed_form():
    model = linear_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    weights = np.linspace(0.0, 2.0, len(x))
    kernel, bias = (w.astype("float64") for w in model.get_weights())
    logs = model.evaluate(x, y, sample_weight=weights, batch_size=16, return_dict=True, verbose=0)
    expected = penalty_float64(kernel, bias, x, y, weights)
    np.testing.assert_allclose(logs["input_gradient_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], logs["ce_loss"] + WEIGHT * expected, rtol=1e-5)


def test_one_sgd_step_follows_the_second_derivative():
    """The weights move by the learning rate times the weighted penalty's
    gradient, from central differences of the float64 formula (which
    differentiates through the input gradient: second order)."""
    model = linear_model()
    rate = 0.05
    model.compile(keras.optimizers.SGD(rate), loss=None)
    x, y = data(8)
    kernel, bias = (w.astype("float64") for w in model.get_weights())
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    moved = [w - w0 for w, w0 in zip(model.get_weights(), (kernel, bias))]
    step = 1e-6
    for index, (parameter, change) in enumerate(zip((kernel, bias), moved)):
        for position in [(0,) * parameter.ndim, *map(tuple, np.argwhere(np.abs(change) > 1e-5))][
            :40
        ]:
            plus, minus = [p.copy() for p in (kernel, bias)], [p.copy() for p in (kernel, bias)]
            plus[index][position] += step
            minus[index][position] -= step
            derivative = (penalty_float64(*plus, x, y) - penalty_float64(*minus, x, y)) / (2 * step)
            np.testing.assert_allclose(
                change[position], -rate * WEIGHT * derivative, rtol=1e-3, atol=1e-7
            )
    assert max(np.abs(change).max() for change in moved) > 1e-4


def test_config_saving_and_the_errors_name_the_fix(tmp_path):
    penalty = assert_config_round_trip(marginfit.InputGradientPenalty(weight=0.5))
    assert penalty == marginfit.InputGradientPenalty(weight=0.5)
    model = linear_model()
    model.compile("sgd", loss=None)
    loaded = assert_model_file_round_trip(model, tmp_path / "model.keras", data(4)[0])
    assert loaded.penalty == model.penalty and loaded.margin is None
    with pytest.raises(ValueError, match="`weight` must be a float >= 0"):
        marginfit.InputGradientPenalty(weight=-1.0)
    with pytest.raises(ValueError, match="Give `margin` or `penalty`, not both"):
        inputs = keras.Input((4,))
        marginfit.MarginModel(
            inputs,
            keras.layers.Dense(3)(inputs),
            margin=marginfit.LargeMargin("input"),
            penalty=marginfit.InputGradientPenalty(),
        )
    with pytest.raises(ValueError, match="MarginModel needs labels"):
        model.evaluate(data(4)[0], verbose=0)
