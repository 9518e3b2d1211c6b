"""`TRADES` against a float64 numpy closed form on a linear softmax model:
its inner maximisation (the KL divergence's input gradient is
``(q - p) W^T``), its logged term, and one SGD step on its gradient through
both the clean and the perturbed predictions; its config; the same numbers
on JAX and PyTorch are in `test_backends.py`."""

import keras
import numpy as np
import pytest
from helpers import CE, assert_config_round_trip, assert_model_file_round_trip, digits

import marginfit
from marginfit import draws

EPS, STEPS, STEP_SIZE, START_STD, BETA = 0.1, 3, 0.04, 0.05, 2.0


def softmax(z):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def linear_trades():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    penalty = marginfit.TRADES(
        EPS, weight=BETA, steps=STEPS, step_size=STEP_SIZE, start_std=START_STD
    )
    return marginfit.MarginModel(inputs, keras.layers.Dense(10)(inputs), penalty=penalty)


def inner_maximisation(kernel, bias, x, noise):
    """``x'`` in float64: signed steps up KL(p || q) from ``x + noise``,
    whose input gradient for a linear model is ``(q - p) W^T``."""
    p = softmax(x @ kernel + bias)
    x_adv = x + noise
    for _ in range(STEPS):
        gradient = (softmax(x_adv @ kernel + bias) - p) @ kernel.T
        x_adv = np.clip(np.clip(x_adv + STEP_SIZE * np.sign(gradient), x - EPS, x + EPS), 0, 1)
    return x_adv


def trades_float64(kernel, bias, x, y, x_adv):
    """``(cross-entropy, KL term, their weights' gradients)`` of a linear
    model, the KL term's gradient through both predictions."""
    n = len(x)
    p, q = softmax(x @ kernel + bias), softmax(x_adv @ kernel + bias)
    log_ratio = np.log(p) - np.log(q)
    kl = np.sum(p * log_ratio, axis=1)
    one_hot = np.eye(10)[y]
    ce = -np.mean(np.log(p[np.arange(n), y]))
    clean = p * (log_ratio - kl[:, None])  # d KL / d clean logits
    perturbed = q - p  # d KL / d perturbed logits
    d_kernel = (x.T @ (p - one_hot) + BETA * (x.T @ clean + x_adv.T @ perturbed)) / n
    d_bias = ((p - one_hot) + BETA * (clean + perturbed)).sum(axis=0) / n
    return ce, kl.mean(), d_kernel, d_bias


def data(count=16):
    x, y = digits(count)
    return x.reshape(count, 64).astype("float32"), y


def noise(x, seed):
    return START_STD * np.asarray(draws.normal_like(x, draws.TRADES_START, seed), "float64")


def test_the_logged_term_is_the_kl_divergence_at_the_inner_maximum():
    model = linear_trades()
    model.compile(loss=CE)
    x, y = data()
    kernel, bias = (w.astype("float64") for w in model.get_weights())
    x_adv = inner_maximisation(kernel, bias, x.astype("float64"), noise(x, 0))
    assert np.abs(x_adv - x).max() == pytest.approx(EPS)  # the attack reached the ball's edge
    ce, kl, _, _ = trades_float64(kernel, bias, x.astype("float64"), y, x_adv)
    logs = model.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["trades_loss"], kl, rtol=1e-4)
    np.testing.assert_allclose(logs["loss"], ce + BETA * kl, rtol=1e-5)
    # x' maximises: the term exceeds the divergence at the random start.
    _, at_start, _, _ = trades_float64(kernel, bias, x, y, x + noise(x, 0))
    assert kl > 10 * at_start


def test_one_sgd_step_follows_the_gradient_through_both_predictions():
    model = linear_trades()
    model.compile(keras.optimizers.SGD(0.5), CE)
    x, y = data()
    kernel, bias = (w.astype("float64") for w in model.get_weights())
    # The first training step draws its start from step number 1.
    x_adv = inner_maximisation(kernel, bias, x.astype("float64"), noise(x, 1))
    _, _, d_kernel, d_bias = trades_float64(kernel, bias, x.astype("float64"), y, x_adv)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    new_kernel, new_bias = model.get_weights()
    np.testing.assert_allclose(new_kernel - kernel, -0.5 * d_kernel, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(new_bias - bias, -0.5 * d_bias, rtol=1e-4, atol=1e-7)


def test_config_saving_and_bad_settings(tmp_path):
    penalty = marginfit.TRADES(0.3)
    assert penalty.attack.step_size == pytest.approx(0.01)  # the authors' MNIST step
    assert assert_config_round_trip(penalty) == penalty
    model = linear_trades()
    model.compile(loss=CE)
    x, _ = data(4)
    loaded = assert_model_file_round_trip(model, tmp_path / "model.keras", x)
    assert loaded.penalty == model.penalty
    for options, message in (
        (dict(eps=0.0), "`eps` must be a positive float"),
        (dict(eps=0.1, steps=0), "`steps` must be an integer >= 1"),
        (dict(eps=0.1, weight=-1.0), "`weight` must be a float >= 0"),
        (dict(eps=0.1, start_std=-1.0), "`start_std` must be a float >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            marginfit.TRADES(**options)
    inputs = keras.Input((3,), dtype="int32")
    with pytest.raises(ValueError, match="TRADES perturbs the model input"):
        logits = keras.layers.Dense(2)(keras.layers.Embedding(5, 2)(inputs)[:, 0])
        marginfit.MarginModel(inputs, logits, penalty=marginfit.TRADES(0.1))
