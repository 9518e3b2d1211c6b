"""FGSM, PGD and minimal perturbations against analytic gradients, linear
models' exact distances and their defining constraints."""

import keras
import numpy as np
import pytest
from helpers import (
    CE,
    assert_config_round_trip,
    assert_model_file_round_trip,
    conv_net,
    digits,
)

import marginfit
from marginfit import MarginModel, attacks, draws


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


# --------------------------------------------- PGD adversarial training


def linear_pgd(kernel, bias, x, y, eps, steps, step_size):
    """PGD on a linear softmax model in float64 numpy, from ``x`` (no random
    start): ``d CE / d x = (softmax(x W + b) - onehot(y)) W^T``."""
    x64, x_adv = x.astype("float64"), x.astype("float64")
    for _ in range(steps):
        logits = x_adv @ kernel + bias
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        gradient = (p - np.eye(kernel.shape[1])[y]) @ kernel.T
        x_adv = np.clip(np.clip(x_adv + step_size * np.sign(gradient), x64 - eps, x64 + eps), 0, 1)
    return x_adv


def test_pgd_follows_the_analytic_gradient_of_a_linear_model():
    model = linear_model()
    rng = np.random.default_rng(2)
    x = rng.uniform(0.0, 1.0, size=(16, 5)).astype("float32")
    y = rng.integers(0, 3, 16)
    attack = attacks.PGD(0.2, steps=5, step_size=0.07, random_start=False)
    expected = linear_pgd(*model.get_weights(), x, y, 0.2, 5, 0.07)
    np.testing.assert_allclose(attack.perturb(model, x, y), expected, atol=1e-6)
    # One-hot labels attack the same way.
    np.testing.assert_allclose(attack.perturb(model, x, np.eye(3)[y]), expected, atol=1e-6)
    # The authors' step rule.
    assert attacks.PGD(0.1, steps=40).step_size == pytest.approx(2.5 * 0.1 / 40)


def test_random_starts_differ_by_seed_and_stay_in_the_ball():
    model = linear_model()
    x = np.full((64, 5), 0.5, "float32")
    y = np.zeros(64, int)
    attack = attacks.PGD(0.1, steps=1, step_size=1e-6)  # ~ the start itself
    a, b = (attack.perturb(model, x, y, seed=[s, 0]).numpy() for s in (0, 1))
    for start in (a, b):
        assert np.abs(start - x).max() <= 0.1 + 1e-6
        assert np.abs(start - x).mean() == pytest.approx(0.05, abs=0.01)  # uniform in the ball
    assert not np.allclose(a, b)


def test_a_pgd_training_step_is_sgd_on_the_perturbed_batch():
    """``MarginModel(adversary=PGD(...))`` replaces the batch by its PGD
    perturbation, then takes the cross-entropy step: against the closed form
    of a linear softmax model."""
    model = linear_model()
    kernel, bias = model.get_weights()
    attack = attacks.PGD(0.1, steps=3, step_size=0.05, random_start=False)
    trained = MarginModel.wrap(model, None, adversary=attack)
    trained.compile(keras.optimizers.SGD(0.5), CE)
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 1.0, size=(8, 5)).astype("float32")
    y = rng.integers(0, 3, 8)
    x_adv = linear_pgd(kernel, bias, x, y, 0.1, 3, 0.05)
    logits = x_adv @ kernel + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    residual = (p - np.eye(3)[y]) / len(x)
    trained.train_on_batch(x, y)
    new_kernel, new_bias = trained.get_weights()
    np.testing.assert_allclose(new_kernel, kernel - 0.5 * x_adv.T @ residual, atol=1e-6)
    np.testing.assert_allclose(new_bias, bias - 0.5 * residual.sum(0), atol=1e-6)


def test_fast_adversarial_training_is_one_step_of_1_25_eps_from_a_random_start():
    """`attacks.fgsm_random_start` (Wong et al. 2020): from the random start
    (clipped to the ball and the range), one signed step of 1.25 eps up the
    analytic gradient, projected back."""
    model = linear_model()
    kernel, bias = (w.astype("float64") for w in model.get_weights())
    rng = np.random.default_rng(4)
    x = rng.uniform(0.0, 1.0, size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, 32)
    adversary = attacks.fgsm_random_start(0.1)
    noise = np.asarray(draws.uniform_like(x, draws.ATTACK_START, 7, -0.1, 0.1), "float64")
    x64 = x.astype("float64")
    start = np.clip(x64 + noise, 0, 1)
    logits = start @ kernel + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    gradient = (p - np.eye(3)[y]) @ kernel.T
    expected = np.clip(np.clip(start + 0.125 * np.sign(gradient), x64 - 0.1, x64 + 0.1), 0, 1)
    perturbed = adversary.perturb(model, x, y, seed=(draws.ATTACK_START, 7))
    np.testing.assert_allclose(perturbed, expected, atol=1e-6)
    assert assert_config_round_trip(adversary) == attacks.PGD(0.1, steps=1, step_size=0.125)


def scripted_attacks(monkeypatch, accuracies):
    """Makes `attacks.adversarial_accuracy` return ``(fgsm, pgd)`` of
    ``accuracies`` epoch by epoch."""
    calls = iter(value for pair in accuracies for value in pair)
    monkeypatch.setattr(attacks, "adversarial_accuracy", lambda *args, **kwargs: next(calls))


class WeightsPerEpoch(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


@pytest.mark.parametrize("stop", [True, False])
def test_catastrophic_overfitting_is_a_pgd_collapse_while_fgsm_holds(monkeypatch, stop):
    """PGD accuracy 0.45 at its best epoch (2), then 0.1 while FGSM accuracy
    is 0.9: a collapse in epoch 4, warned and recorded; with ``stop``,
    training ends there and the model gets epoch 2's weights back."""
    scripted_attacks(monkeypatch, [(0.5, 0.3), (0.6, 0.45), (0.7, 0.4), (0.9, 0.1), (0.9, 0.1)])
    model = linear_model()
    model.compile(keras.optimizers.SGD(0.1), CE)
    x = np.random.default_rng(5).uniform(0.0, 1.0, size=(32, 5)).astype("float32")
    y = np.arange(32) % 3
    watch = marginfit.CatastrophicOverfitting(x, y, eps=0.1, stop=stop)
    record = WeightsPerEpoch()
    with pytest.warns(marginfit.callbacks.CatastrophicOverfittingWarning, match="epoch 4"):
        history = model.fit(x, y, epochs=5, verbose=0, callbacks=[watch, record])
    assert watch.collapsed_epoch == 3 and watch.best_epoch == 1
    assert history.history["pgd_accuracy"][:4] == [0.3, 0.45, 0.4, 0.1]
    assert history.history["fgsm_accuracy"][:4] == [0.5, 0.6, 0.7, 0.9]
    assert len(history.history["loss"]) == (4 if stop else 5)
    expected = record.weights[1] if stop else record.weights[-1]
    for weight, value in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(weight, value)


def test_a_fall_of_both_accuracies_is_not_catastrophic_overfitting(monkeypatch):
    """PGD accuracy falls 0.35 from its best, but FGSM accuracy falls with it:
    the model is getting worse, not fooling its one-step attack."""
    scripted_attacks(monkeypatch, [(0.6, 0.45), (0.3, 0.1)])
    model = linear_model()
    model.compile(keras.optimizers.SGD(0.1), CE)
    x, y = np.zeros((4, 5), "float32"), np.zeros(4, int)
    watch = marginfit.CatastrophicOverfitting(x, y, eps=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=2, verbose=0, callbacks=[watch])
    assert watch.collapsed_epoch is None


def test_the_adversary_survives_saving(tmp_path):
    model, _ = conv_net(None)
    adversarial = MarginModel.wrap(model, None, adversary=attacks.PGD(0.1, steps=2))
    assert_config_round_trip(attacks.PGD(0.1, steps=7, clip=None))
    x, _ = digits(4)
    loaded = assert_model_file_round_trip(adversarial, tmp_path / "model.keras", x)
    assert loaded.adversary == attacks.PGD(0.1, steps=2)


def test_restarts_only_lower_the_attacked_accuracy(trained):
    model, x, y = trained
    once = attacks.adversarial_accuracy(model, x, y, 0.1, "pgd", steps=5)
    thrice = attacks.adversarial_accuracy(model, x, y, 0.1, "pgd", restarts=3, steps=5)
    assert thrice <= once


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: attacks.PGD(0.0), "`eps` must be a positive float"),
        (lambda: attacks.PGD(0.1, steps=0), "`steps` must be an integer >= 1"),
        (lambda: attacks.PGD(0.1, step_size=-1.0), "`step_size` must be > 0"),
        (lambda: MarginModel.wrap(linear_model(), None, adversary="pgd"), "`adversary` must be"),
        (lambda: marginfit.CatastrophicOverfitting([[0.0]], [0], eps=0.0), "`eps` must be > 0"),
        (lambda: marginfit.CatastrophicOverfitting([[0.0]], [0], 0.1, drop=1.0), "`drop` must"),
        (lambda: marginfit.CatastrophicOverfitting([[0.0]], [], 0.1), "the same, non-zero"),
    ],
)
def test_bad_adversaries(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_the_cw_loss_follows_the_logit_difference_of_a_linear_model():
    """With ``loss="cw"`` a step follows ``sign(w_j - w_y)`` for the
    highest other logit ``j``, however confident the model: a softmax that
    saturates to a zero cross-entropy gradient does not stop it."""
    model = linear_model()
    kernel, bias = model.get_weights()
    model.set_weights([kernel * 1e3, bias * 1e3])  # saturated softmax
    rng = np.random.default_rng(4)
    x = rng.uniform(0.2, 0.8, size=(16, 5)).astype("float32")
    logits = x @ kernel + bias
    y = logits.argmax(-1)  # correctly classified, with huge margins
    rival = np.where(np.eye(3)[y] > 0, -np.inf, logits).argmax(-1)
    expected = x + 0.05 * np.sign(kernel[:, rival].T - kernel[:, y].T)
    np.testing.assert_allclose(attacks.fgsm(model, x, y, 0.05, loss="cw"), expected, rtol=1e-6)
    # Where the logit gap exceeds float32's exp range, the cross-entropy's
    # gradient underflows to 0: FGSM on it is stuck there.
    gap = 1e3 * (logits[np.arange(16), y] - logits[np.arange(16), rival])
    saturated = gap > 110
    assert saturated.sum() >= 8
    stuck = attacks.fgsm(model, x, y, 0.05).numpy()[saturated]
    np.testing.assert_allclose(stuck, x[saturated], rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown `loss='hinge'`"):
        attacks.PGD(0.1, loss="hinge")


# --------------------------------------------- minimal perturbations


def linear_distances(kernel, bias, x, norm):
    """Float64 distance from each row of ``x`` to the boundary of its
    predicted class ``y`` in a linear model: ``min_k (z_y - z_k) / ||w_y -
    w_k||_*``, the dual norm of ``norm`` (the class's region is convex, so
    its nearest face is the nearest boundary)."""
    logits = x.astype("float64") @ kernel + bias
    y = logits.argmax(-1)
    gaps = logits[np.arange(len(x)), y][:, None] - logits
    differences = kernel[:, y].T[:, None, :] - kernel.T[None, :, :]  # [batch, k, features]
    dual = np.abs(differences).sum(-1) if norm == "inf" else np.linalg.norm(differences, axis=-1)
    with np.errstate(invalid="ignore"):  # 0 / 0 at the label itself
        ratio = np.where(np.eye(kernel.shape[1], dtype=bool)[y], np.inf, gaps / dual)
    return ratio.min(-1), y


def lengths(x_adv, x, norm):
    """``[batch]`` norms of each example's perturbation, in float64."""
    moved = (x_adv.astype("float64") - x).reshape(len(x), -1)
    return np.linalg.norm(moved, ord=np.inf if norm == "inf" else 2, axis=-1)


@pytest.mark.parametrize("norm", [2, "inf"])
def test_minimal_perturbation_is_the_distance_to_a_linear_boundary(norm):
    model = linear_model()
    kernel, bias = (w.astype("float64") for w in model.get_weights())
    x = np.random.default_rng(3).normal(size=(64, 5)).astype("float32")
    expected, y = linear_distances(kernel, bias, x, norm)
    sizes, x_adv = attacks.minimal_perturbation(model, x, y, norm=norm)
    # One DeepFool step lands 2 % past the boundary; bisection (10 halvings)
    # brings it back to within 2 ** -10 of the step's length.
    np.testing.assert_allclose(sizes, expected, rtol=2e-3)
    assert np.all(sizes >= expected * (1 - 1e-5))
    np.testing.assert_allclose(lengths(x_adv, x, norm), sizes, rtol=1e-5)
    assert np.all(np.argmax(model.predict(x_adv, verbose=0), -1) != y)


def test_pgd_flips_exactly_the_examples_beyond_their_minimal_perturbation():
    """On a two-class linear model, L-inf PGD on the logit difference reaches
    the best vertex of the ball, so it flips an example exactly when the
    ball is larger than its minimal perturbation."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    x = np.random.default_rng(4).normal(size=(200, 6)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), -1)
    sizes, _ = attacks.minimal_perturbation(model, x, y, norm="inf")
    eps = float(np.median(sizes))
    clear = np.abs(sizes - eps) > 0.01 * eps
    perturbed = attacks.pgd(model, x, y, eps, steps=20, clip=None, loss="cw")
    fooled = np.argmax(model.predict(perturbed, verbose=0), -1) != y
    np.testing.assert_array_equal(fooled[clear], (sizes < eps)[clear])
    assert 80 < clear.sum() and 0 < fooled[clear].sum() < clear.sum()


def test_minimal_perturbations_of_a_network_flip_it(trained):
    """On a conv net: each returned input is misclassified at the reported
    distance, misclassified inputs are at 0, and bisection only shortens."""
    model, x, y = trained
    y = y.copy()
    y[:4] = (np.argmax(model.predict(x[:4], verbose=0), -1) + 1) % 10  # wrong already
    for norm in (2, "inf"):
        sizes, x_adv = attacks.minimal_perturbation(model, x, y, norm=norm, batch_size=50)
        # The same batches: a batch's size changes the float rounding of the
        # model's matrix products, and so, near a tie, DeepFool's path.
        unrefined, _ = attacks.minimal_perturbation(
            model, x, y, norm=norm, bisection=0, batch_size=50
        )
        assert np.all(sizes[:4] == 0) and np.all(np.isfinite(sizes))
        np.testing.assert_allclose(lengths(x_adv, x, norm), sizes, rtol=1e-5, atol=1e-7)
        assert np.all(np.argmax(model.predict(x_adv, verbose=0), -1) != y)
        assert np.all(sizes <= unrefined + 1e-7) and np.all(sizes[4:] > 0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"norm": 1}, "Unknown `norm=1`"),
        ({"steps": 0}, "`steps` must be an integer >= 1"),
        ({"bisection": -1}, "`bisection` must be an integer >= 0"),
        ({"overshoot": -0.1}, "`overshoot` must be >= 0"),
    ],
)
def test_bad_minimal_perturbation_arguments(options, message):
    x = np.full((2, 5), 0.5, "float32")
    with pytest.raises(ValueError, match=message):
        attacks.minimal_perturbation(linear_model(), x, np.array([0, 1]), **options)
