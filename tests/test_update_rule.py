"""Update rules (`marginfit.SAM`, adaptive too) against a float64 numpy
reference: a two-layer net whose loss (cross-entropy plus the input-gradient
penalty, in closed form) is differentiated by central differences; with
layer groups, Keras' gradient accumulation, the non-finite guard, mixed
precision and saving."""

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip, assert_model_file_round_trip
from nets import float64

import marginfit

WEIGHT = 0.7  # of the input-gradient penalty
RATES = (0.1, 0.3)  # of the hidden and the logits layer's optimizer
RNG = np.random.default_rng(0)
X = RNG.normal(size=(12, 5))
Y = np.arange(12) % 3


def model_for(rule, penalty=True):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    logits = keras.layers.Dense(3, name="logits")(hidden)
    return marginfit.MarginModel(
        inputs, logits, update_rule=rule,
        penalty=marginfit.InputGradientPenalty(weight=WEIGHT) if penalty else None,
    )  # fmt: skip


def grouped(model, accumulation=None):
    sgd = lambda rate, name: keras.optimizers.SGD(  # noqa: E731
        rate, name=name, gradient_accumulation_steps=accumulation
    )
    groups = [(sgd(RATES[0], "features"), ["hidden"]), (sgd(RATES[1], "head"), ["logits"])]
    return marginfit.discriminative_optimizer(model, groups)


def loss_float64(params, x, y, penalty=True):
    """Mean cross-entropy plus ``WEIGHT`` times the mean squared norm of each
    example's input gradient ``W1 ((1 - h^2) * W2 (p - y))``."""
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(3)[y]
    ce = -np.log((p * onehot).sum(-1))
    input_gradient = (((p - onehot) @ w2.T) * (1 - h**2)) @ w1.T
    return ce.mean() + (WEIGHT * (input_gradient**2).sum(-1).mean() if penalty else 0.0)


def gradient_float64(params, x, y, penalty=True, h=1e-6):
    """Central differences of `loss_float64` (error about 1e-10)."""
    gradients = []
    for i, p in enumerate(params):
        g = np.zeros_like(p)
        for index in np.ndindex(p.shape):
            shifted = [q.copy() for q in params]
            shifted[i][index] += h
            up = loss_float64(shifted, x, y, penalty)
            shifted[i][index] -= 2 * h
            g[index] = (up - loss_float64(shifted, x, y, penalty)) / (2 * h)
        gradients.append(g)
    return gradients


def sam_float64(params, x, y, rho, adaptive=False, eta=0.01, penalty=True):
    """The gradient SAM (or adaptive SAM) applies, from its definition."""
    g = gradient_float64(params, x, y, penalty)
    t = [np.abs(p) + eta if adaptive else np.ones_like(p) for p in params]
    norm = np.sqrt(sum(((tg * gg) ** 2).sum() for tg, gg in zip(t, g)))
    shifted = [p + rho * tg**2 * gg / (norm + 1e-12) for p, tg, gg in zip(params, t, g)]
    return gradient_float64(shifted, x, y, penalty)


@pytest.mark.parametrize(
    "rule", [dict(rho=0.2), dict(rho=0.5, adaptive=True)], ids=["sam", "adaptive"]
)
def test_one_step_applies_the_gradient_at_the_perturbed_weights(rule):
    """SAM's two gradients include the penalty's term; each layer group
    steps at its own rate."""
    with float64():
        model = model_for(marginfit.SAM(**rule))
        model.compile(grouped(model), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [w.numpy() for w in model.trainable_weights]
        model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
        after = [w.numpy() for w in model.trainable_weights]
    expected = sam_float64(before, X, Y, **rule)
    plain = gradient_float64(before, X, Y)
    for i, (w0, w1, g) in enumerate(zip(before, after, expected)):
        rate = RATES[i // 2]
        np.testing.assert_allclose(w1, w0 - rate * g, rtol=1e-7, atol=1e-9)
        assert np.abs(g - plain[i]).max() > 1e-3  # not the plain gradient


def test_gradient_accumulation_applies_the_mean_of_the_sam_gradients():
    """Keras' ``gradient_accumulation_steps=2`` with SAM: two batches, one
    update by the mean of their SAM gradients, each group at its rate."""
    with float64():
        model = model_for(marginfit.SAM(rho=0.2))
        optimizer = grouped(model, accumulation=2)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [w.numpy() for w in model.trainable_weights]
        model.fit(X, Y, batch_size=6, epochs=1, shuffle=False, verbose=0)
        after = [w.numpy() for w in model.trainable_weights]
    halves = [sam_float64(before, X[s], Y[s], rho=0.2) for s in (slice(0, 6), slice(6, 12))]
    for i, (w0, w1) in enumerate(zip(before, after)):
        mean = (halves[0][i] + halves[1][i]) / 2
        np.testing.assert_allclose(w1, w0 - RATES[i // 2] * mean, rtol=1e-7, atol=1e-9)


def test_a_non_finite_step_changes_nothing_and_is_counted():
    """A NaN in the second of two batches: the weights and Adam's state
    are those after the first batch alone."""
    import tensorflow as tf

    x = X.astype("float32")
    x[8, 0] = np.nan
    ends, counts = [], []
    for data in [(x, Y), (x[:6], Y[:6])]:
        model = model_for(marginfit.SAM())
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        batches = tf.data.Dataset.from_tensor_slices(data).batch(6)
        history = model.fit(batches, epochs=1, verbose=0)
        ends.append([v.numpy() for v in model.trainable_weights + model.optimizer.variables])
        counts.append(history.history["nonfinite_steps"])
    assert counts == [[1.0], [0.0]]
    for poisoned, clean in zip(*ends, strict=True):
        np.testing.assert_array_equal(poisoned, clean)


def test_mixed_precision_takes_the_float32_step():
    """Under ``mixed_float16`` (loss scaling) SAM's step is the float32 one
    to float16 rounding: the direction of a scaled gradient is the same."""
    steps = {}
    for policy in ["float32", "mixed_float16"]:
        keras.config.set_dtype_policy(policy)
        try:
            model = model_for(marginfit.SAM(rho=0.2), penalty=False)
            model.compile(
                keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(True)
            )
            before = [w.numpy() for w in model.trainable_weights]
            model.fit(X.astype("float32"), Y, batch_size=len(X), verbose=0)
            steps[policy] = [w.numpy() - w0 for w, w0 in zip(model.trainable_weights, before)]
        finally:
            keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(model.optimizer.dynamic_scale) > 1  # the loss was scaled
    for mixed, full in zip(steps["mixed_float16"], steps["float32"]):
        np.testing.assert_allclose(mixed, full, atol=2e-3 * np.abs(full).max())


def test_the_rule_saves_and_reloads(tmp_path):
    rule = marginfit.SAM(rho=0.3, adaptive=True, eta=0.02)
    assert assert_config_round_trip(rule).get_config() == rule.get_config()
    model = model_for(rule)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X.astype("float32"), Y, verbose=0)
    loaded = assert_model_file_round_trip(model, tmp_path / "sam.keras", X.astype("float32"))
    assert loaded.update_rule.get_config() == rule.get_config()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(rule=marginfit.SAM), "`update_rule` must be a `marginfit.UpdateRule`"),
        (dict(rho=0.0), "SAM needs rho > 0 and eta >= 0"),
        (dict(eta=-1.0), "SAM needs rho > 0 and eta >= 0"),
    ],
)
def test_bad_rules_are_refused_with_the_fix(bad, message):
    with pytest.raises((TypeError, ValueError)) as raised:
        model_for(bad["rule"]) if "rule" in bad else marginfit.SAM(**bad)
    assert str(raised.value).splitlines()[0].startswith(message)


class StopAfter(keras.callbacks.Callback):
    """Interrupts `fit()` at the end of training batch ``batch``."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise KeyboardInterrupt


def test_accumulated_gradients_survive_a_resume(tmp_path):
    """Interrupted after 3 of 4 batches (one SAM gradient accumulated, not
    yet applied) and resumed from `marginfit.BackupAndRestore`: the weights
    of the uninterrupted run."""
    x = X.astype("float32")

    def run(callbacks):
        model = model_for(marginfit.SAM(rho=0.2))
        model.compile(
            grouped(model, accumulation=2), keras.losses.SparseCategoricalCrossentropy(True)
        )
        model.fit(x, Y, batch_size=3, shuffle=False, callbacks=callbacks, verbose=0)
        return model

    backup = lambda: marginfit.BackupAndRestore(str(tmp_path / "backup"), save_freq=1)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run([backup(), StopAfter(2)])
    resumed = run([backup()])
    uninterrupted = run([])
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert (
        max(
            np.abs(a - b).max()
            for a, b in zip(resumed.get_weights(), model_for(None).get_weights())
        )
        > 1e-3
    )
