"""The losses robust to label noise against float64 numpy formulas written
from the papers (with the reference code's clipping constants), alone and as
the compiled loss of a plain model and of a `MarginModel`."""

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip, conv_net, digits

from marginfit import LargeMargin, losses

A = -np.log(1e-4)  # -log 0 in the reverse cross-entropy (reference code)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def reference(name, z, y, **settings):
    """Per-example loss in float64 numpy from logits ``z`` and labels ``y``."""
    z = z.astype("float64")
    p = softmax(z)
    rows = np.arange(len(y))
    p_y = p[rows, y]
    log_p = np.log(p)
    off_label = np.maximum(p, 1e-7).sum(axis=-1) - np.maximum(p_y, 1e-7)
    rce = A * off_label
    if name == "gce":
        q = settings["q"]
        return (1 - np.maximum(p_y, 1e-7) ** q) / q
    if name == "sce":
        return settings["alpha"] * -log_p[rows, y] + settings["beta"] * rce
    if name == "nce-rce":
        nce = log_p[rows, y] / log_p.sum(axis=-1)
        return settings["alpha"] * nce + settings["beta"] * rce
    if name == "anl-ce":
        nce = log_p[rows, y] / log_p.sum(axis=-1)
        shifted = -np.log(1e-7) + np.log(np.maximum(p, 1e-7))
        nnce = 1 - shifted[rows, y] / shifted.sum(axis=-1)
        return settings["alpha"] * nce + settings["beta"] * nnce
    if name == "ldr-kl":
        c, lam = settings["margin"], settings["temperature"]
        s = np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0)  # softplus, float64
        s = s / s.mean(axis=-1, keepdims=True)
        gaps = c * (1 - np.eye(z.shape[-1])[y]) + s - s[rows, y][:, None]
        return lam * np.log(np.mean(np.exp(gaps / lam), axis=-1))
    m = settings["m"]
    p_eps = p.copy()
    p_eps[rows, p.argmax(axis=-1)] += m
    p_eps /= 1 + m
    ce_eps = -np.log(np.maximum(p_eps[rows, y], 1e-8))
    return settings["alpha"] * ce_eps + settings["beta"] * 2 * (1 - p_y)


CASES = {
    "gce": (losses.GeneralizedCrossEntropy, {"q": 0.7}),
    "sce": (losses.SymmetricCrossEntropy, {"alpha": 0.01, "beta": 1.0}),
    "nce-rce": (losses.NCEAndRCE, {"alpha": 1.0, "beta": 10.0}),
    "ce-eps-mae": (losses.EpsilonSoftmaxCEAndMAE, {"m": 1e5, "alpha": 0.01, "beta": 5.0}),
    "anl-ce": (losses.ActiveNegativeLoss, {"alpha": 1.0, "beta": 1.0}),
    "ldr-kl": (losses.LDRKL, {"margin": 0.1, "temperature": 10.0}),
}
ON_LOGITS_ONLY = ("ldr-kl",)


def logits(seed, scale, batch=12, classes=10):
    return (np.random.default_rng(seed).normal(size=(batch, classes)) * scale).astype("float32")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scale", [0.5, 4.0, 30.0])  # 30: saturated, clipping acts
@pytest.mark.parametrize("labels", ["sparse", "one-hot"])
def test_value_against_numpy(name, scale, labels):
    cls, settings = CASES[name]
    z = logits(0, scale)
    y = np.random.default_rng(1).integers(0, 10, len(z))
    weights = np.linspace(0.0, 2.0, len(z)).astype("float32")
    y_true = y if labels == "sparse" else np.eye(10, dtype="float32")[y]
    expected = reference(name, z, y, **settings)
    loss = cls(**settings, from_logits=True)
    np.testing.assert_allclose(float(loss(y_true, z)), expected.mean(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(
        float(loss(y_true, z, sample_weight=weights)),
        (weights * expected).mean(),
        rtol=2e-5,
        atol=1e-6,
    )
    # The same from probabilities (away from saturation, where log p is exact).
    if scale < 30 and name not in ON_LOGITS_ONLY:
        probabilities = softmax(z.astype("float64")).astype("float32")
        value = cls(**settings)(y_true, probabilities)
        np.testing.assert_allclose(float(value), expected.mean(), rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_against_finite_differences(name):
    """d loss / d logits against central differences of the float64 formula."""
    import tensorflow as tf

    cls, settings = CASES[name]
    z = logits(2, 2.0, batch=4)
    y = np.array([0, 3, 3, 9])
    variable = tf.Variable(z)
    with tf.GradientTape() as tape:
        value = cls(**settings, from_logits=True)(y, variable)
    gradient = tape.gradient(value, variable).numpy()
    expected = np.zeros_like(z, dtype="float64")
    step = 1e-5
    for index in np.ndindex(z.shape):
        plus, minus = z.astype("float64"), z.astype("float64")
        plus[index] += step
        minus[index] -= step
        expected[index] = (
            reference(name, plus, y, **settings).mean()
            - reference(name, minus, y, **settings).mean()
        ) / (2 * step)
    np.testing.assert_allclose(gradient, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_config_round_trip_and_bad_settings(name):
    cls, settings = CASES[name]
    revived = assert_config_round_trip(cls(**settings, from_logits=True))
    assert revived.from_logits is True
    key = next(iter(settings))
    with pytest.raises(ValueError, match=f"`{key}` must be"):
        cls(**{**settings, key: -1.0})
    if name in ON_LOGITS_ONLY:
        with pytest.raises(ValueError, match="defined on logits"):
            cls(**settings, from_logits=False)


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_loss_of_a_plain_model_and_beside_the_margin(name):
    """``loss`` of a plain Keras model and ``ce_loss`` (the compiled loss)
    of a `MarginModel` are the numpy formula on their predictions."""
    cls, settings = CASES[name]
    x, y = digits(16)
    keras.utils.set_random_seed(0)
    plain = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    margin_model, _ = conv_net(LargeMargin(["input", "dense"]))
    for model, key in ((plain, "loss"), (margin_model, "ce_loss")):
        model.compile(keras.optimizers.SGD(0.1), loss=cls(**settings, from_logits=True))
        expected = reference(name, model.predict(x, verbose=0), y, **settings).mean()
        logs = model.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
        np.testing.assert_allclose(logs[key], expected, rtol=1e-5)
    history = margin_model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
