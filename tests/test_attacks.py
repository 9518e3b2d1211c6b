"""FGSM and PGD against analytic gradients and their defining constraints."""

import keras
import numpy as np
import pytest
from helpers import CE, conv_net, digits

from marginfit import attacks


def linear_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=3).astype("float32")]
    )
    return model


def test_fgsm_follows_the_analytic_gradient_sign():
    model = linear_model()
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.8, size=(16, 5)).astype("float32")
    y = rng.integers(0, 3, 16)
    kernel, bias = model.get_weights()
    logits = x @ kernel + bias
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    gradient = (softmax - np.eye(3)[y]) @ kernel.T  # d CE / d x, per example
    expected = x + 0.05 * np.sign(gradient)
    np.testing.assert_allclose(attacks.fgsm(model, x, y, 0.05), expected, rtol=1e-6)


@pytest.fixture(scope="module")
def trained():
    """A conv net fitted to 128 digits, and the digits."""
    model, _ = conv_net()
    model.compile(keras.optimizers.Adam(1e-2), CE)
    x, y = digits(128)
    model.fit(x, y, epochs=15, verbose=0)
    return model, x, y


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_perturbations_stay_in_the_ball_and_range_and_raise_the_loss(trained, attack):
    model, x, y = trained
    eps = 0.1
    perturbed = getattr(attacks, attack)(model, x, y, eps).numpy()
    assert np.abs(perturbed - x).max() <= eps + 1e-6
    assert perturbed.min() >= 0.0 and perturbed.max() <= 1.0
    assert np.abs(perturbed - x).max() > eps / 2  # it moved
    clean = float(CE(y, model.predict(x, verbose=0)))
    attacked = float(CE(y, model.predict(perturbed, verbose=0)))
    assert attacked > clean * 1.5


def test_pgd_is_stronger_than_fgsm_and_reduces_to_it(trained):
    model, x, y = trained
    one_step = attacks.pgd(model, x, y, 0.1, steps=1, step_size=0.1, random_start=False)
    np.testing.assert_allclose(one_step, attacks.fgsm(model, x, y, 0.1), rtol=1e-6)
    losses = {
        name: float(CE(y, model.predict(adversarial, verbose=0)))
        for name, adversarial in [
            ("fgsm", attacks.fgsm(model, x, y, 0.1)),
            ("pgd", attacks.pgd(model, x, y, 0.1, steps=10)),
        ]
    }
    assert losses["pgd"] >= losses["fgsm"]
    clean = np.mean(np.argmax(model.predict(x, verbose=0), -1) == y)
    assert attacks.adversarial_accuracy(model, x, y, 0.0, batch_size=50) == pytest.approx(clean)
    assert attacks.adversarial_accuracy(model, x, y, 0.1, "pgd", batch_size=50) < clean


def test_probability_outputs_are_attacked_like_logits():
    x, y = digits(32)
    logits_model, _ = conv_net(output="logits")
    probabilities_model, _ = conv_net(output="probabilities")
    a = attacks.fgsm(logits_model, x, y, 0.05).numpy()
    b = attacks.fgsm(probabilities_model, x, y, 0.05).numpy()
    assert np.mean(np.isclose(a, b, atol=1e-6)) > 0.99


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x, y: attacks.fgsm(m, x, y, -0.1), "`eps` must be >= 0"),
        (lambda m, x, y: attacks.fgsm(m, x, y, 0.1, clip=(1.0, 0.0)), "low < high"),
        (lambda m, x, y: attacks.pgd(m, x, y, 0.1, steps=0), "`steps` must be >= 1"),
        (lambda m, x, y: attacks.adversarial_accuracy(m, x, y, 0.1, "cw"), "Unknown attack"),
    ],
)
def test_bad_arguments(call, message):
    model = linear_model()
    x = np.full((2, 5), 0.5, "float32")
    with pytest.raises(ValueError, match=message):
        call(model, x, np.array([0, 1]))
