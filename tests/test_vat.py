"""`marginfit.VAT` on a linear softmax model, against the float64 closed
form: the power iteration's input gradient is ``(q - p) W^T`` there, and
the term's weight gradient at the fixed perturbation ``(x + r)^T (q - p)``."""

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip
from nets import float64

import marginfit
from marginfit import draws

EPS, XI, WEIGHT, RATE = 1.5, 1e-6, 2.0, 0.5
RNG = np.random.default_rng(3)
X = RNG.normal(size=(10, 6))
Y = np.arange(10) % 4
WEIGHTS = np.linspace(0.2, 1.8, 10)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def unit(d):
    return d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)


def reference(w, b, x, step, sample_weight=None):
    """``(term, [dW, db])`` of ``WEIGHT * KL(p(x) || p(x + r))`` with the
    start the library draws at ``step`` and one power iteration."""
    d = np.asarray(draws.normal_like(keras.ops.convert_to_tensor(x), draws.VAT_START, step))
    p = softmax(x @ w + b)
    g = (softmax((x + XI * unit(d.astype("float64"))) @ w + b) - p) @ w.T
    shifted = x + EPS * unit(g)
    q = softmax(shifted @ w + b)
    weights = np.ones(len(x)) if sample_weight is None else sample_weight
    term = np.mean(weights * np.sum(p * (np.log(p) - np.log(q)), -1))
    dz = WEIGHT * weights[:, None] * (q - p) / len(x)
    return term, [shifted.T @ dz, dz.sum(0)]


def model_for():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,))
    logits = keras.layers.Dense(4, name="logits")(inputs)
    return marginfit.MarginModel(inputs, logits, penalty=marginfit.VAT(EPS, WEIGHT, xi=XI))


def test_the_term_and_its_step_are_the_closed_form():
    """Evaluation draws the start of step 0, the first training step that
    of step 1; labels play no part (no loss is compiled)."""
    with float64():
        model = model_for()
        model.compile(keras.optimizers.SGD(RATE), loss=None)
        w0, b0 = (v.numpy() for v in model.trainable_weights)
        logs = model.evaluate(
            X, Y, sample_weight=WEIGHTS, batch_size=10, verbose=0, return_dict=True
        )
        model.fit(X, Y, sample_weight=WEIGHTS, batch_size=10, shuffle=False, verbose=0)
    term, _ = reference(w0, b0, X, 0, WEIGHTS)
    np.testing.assert_allclose(logs["vat_loss"], term, rtol=1e-6)
    assert term > 1e-2
    _, gradients = reference(w0, b0, X, 1, WEIGHTS)
    for before, after, g in zip([w0, b0], model.trainable_weights, gradients, strict=True):
        np.testing.assert_allclose(after.numpy(), before - RATE * g, rtol=1e-6, atol=1e-10)


def test_config_and_refusals():
    vat = marginfit.VAT(2.0, weight=0.5, xi=1e-5, power_iterations=2)
    assert assert_config_round_trip(vat) == vat
    with pytest.raises(ValueError, match="VAT needs eps > 0"):
        marginfit.VAT(0.0)
    with pytest.raises(ValueError, match="`power_iterations` must be an int >= 1"):
        marginfit.VAT(1.0, power_iterations=0)
    inputs = keras.Input((3,), dtype="int32")
    logits = keras.layers.Dense(2)(keras.layers.Embedding(5, 2)(inputs)[:, 0])
    with pytest.raises(ValueError, match="VAT perturbs the model input"):
        marginfit.MarginModel(inputs, logits, penalty=vat)
