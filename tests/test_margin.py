"""LargeMargin's validation and config, and the pure penalty math."""

import importlib
import re

import hypothesis
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_config_round_trip, normalized
from hypothesis import strategies as st
from reference import balance_reference

from marginfit import LargeMargin, backend, distances
from marginfit import margin as margin_lib


def test_defaults_match_the_documented_signature():
    margin = LargeMargin(["input"])
    assert margin.get_config() == {
        "layers": ["input"],
        "gamma": [10000.0],
        "norm": 2,
        "top_k": 1,
        "competitors": "sampled",
        "aggregation": "max",
        "alpha": 4.0,
        "epsilon": 1e-6,
        "approximate": True,
        "layer_weights": None,
        "space": "probabilities",
        "weight": 1.0,
        "coupling": "batch",
        "balance": 1.0,
    }


@pytest.mark.parametrize("norm", [1, 2, np.inf, "inf", float("inf")])
def test_config_round_trip(norm):
    margin = LargeMargin(
        ["input", "dense"],
        gamma=[2.0, 3.0],
        norm=norm,
        top_k=3,
        aggregation="sum",
        alpha=2.0,
        approximate=False,
        layer_weights=[64.0, 16.0],
        space="logits",
        weight=0.5,
        coupling="inference",
        competitors="sampled",
        balance=0.25,
    )
    revived = assert_config_round_trip(margin)
    assert revived == margin
    assert revived.dual_norm == {1: np.inf, 2: 2, np.inf: 1}[float(norm)]


def test_layer_objects_are_accepted_by_name():
    dense = keras.layers.Dense(3, name="features")
    assert LargeMargin(["input", dense]).layers == ("input", "features")
    assert LargeMargin(dense).layers == ("features",)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(gamma=0.0), "`gamma` must be a positive"),
        (dict(gamma=-1.0), "`gamma` must be a positive"),
        (dict(gamma=[1.0]), "`gamma` has 1 values but the margin has 2 layers"),
        (dict(norm=3), "norm=3"),
        (dict(norm="l2"), "pass `norm=1`, `norm=2` or `norm='inf'`"),
        (dict(top_k=0), "`top_k` must be an integer >= 1"),
        (dict(top_k=1.5), "`top_k` must be an integer >= 1"),
        (dict(alpha=0.0), "`alpha` must be a float > 0"),
        (dict(aggregation="mean"), "use 'max' (nearest competitor) or 'sum'"),
        (dict(space="softmax"), "use 'probabilities' or 'logits'"),
        (dict(layer_weights=[1.0, 0.0]), "`layer_weights` must hold positive"),
        (dict(weight=-1.0), "`weight` must be a float >= 0"),
        (dict(coupling="none"), "use 'batch' or 'inference'"),
        (dict(competitors="random"), "use 'top' (highest-scoring classes) or 'sampled'"),
        (dict(balance=-0.5), "`balance` must be a finite float >= 0"),
        (dict(balance=float("inf")), "`balance` must be a finite float >= 0"),
    ],
)
def test_bad_arguments_name_the_fix(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LargeMargin(["input", "dense"], **arguments)


def test_empty_and_duplicate_layers_are_rejected():
    with pytest.raises(ValueError, match="Name at least one layer"):
        LargeMargin([])
    with pytest.raises(ValueError, match="listed twice"):
        LargeMargin(["dense", "dense"])


def test_score_differences_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32")
    labels = np.array([0, 1, 2, 3, 4, 0])
    probabilities = tf.nn.softmax(logits).numpy()
    for space, scores in [("logits", logits), ("probabilities", probabilities)]:
        got = distances.score_differences(logits, labels, 3, space, "logits")
        for k in range(6):
            others = np.delete(scores[k], labels[k])
            top = np.sort(others)[::-1][:3]
            np.testing.assert_allclose(got[k], scores[k, labels[k]] - top, rtol=1e-6, atol=1e-7)
    # Differences of log-probabilities equal differences of logits.
    from_probabilities = distances.score_differences(
        probabilities, labels, 3, "logits", "probabilities"
    )
    np.testing.assert_allclose(
        from_probabilities,
        distances.score_differences(logits, labels, 3, "logits", "logits"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_sampled_competitors_are_uniform_distinct_and_never_the_label():
    rng = np.random.default_rng(0)
    count, classes, top_k = 4000, 5, 2
    logits = rng.normal(size=(count, classes)).astype("float32")
    labels = rng.integers(0, classes, count)
    draws = rng.random((count, classes)).astype("float32")
    differences = distances.score_differences(
        logits, labels, top_k, "logits", "logits", draws
    ).numpy()
    # Recover each competitor from its difference.
    competitors = np.argmin(
        np.abs(
            logits[:, None, :]
            - (logits[np.arange(count), labels][:, None] - differences)[..., None]
        ),
        axis=-1,
    )
    assert np.all(competitors != labels[:, None])
    assert np.all(competitors[:, 0] != competitors[:, 1])
    # The keys' order: competitors are the largest keys of the other classes.
    masked = np.where(np.eye(classes, dtype=bool)[labels], -1.0, draws)
    np.testing.assert_array_equal(competitors, np.argsort(-masked, axis=-1)[:, :top_k])
    # Uniform over the other classes: each of the 4 is chosen in half the
    # draws (2 of 4); binomial standard deviation sqrt(n p (1-p)).
    for label in range(classes):
        chosen = competitors[labels == label].reshape(-1)
        n = int(np.sum(labels == label))
        frequencies = np.bincount(chosen, minlength=classes)
        assert frequencies[label] == 0
        others = np.delete(frequencies, label)
        assert np.all(np.abs(others - n / 2) < 5 * np.sqrt(n / 4)), others


def test_class_indices_from_sparse_and_one_hot_labels():
    labels = np.array([3, 0, 9])
    for given in (labels, labels[:, None], np.eye(10)[labels]):
        np.testing.assert_array_equal(backend.class_indices(given, 10), labels)
    with pytest.raises(tf.errors.InvalidArgumentError, match="< 10"):
        backend.class_indices(np.array([1, 10]), 10)
    with pytest.raises(tf.errors.InvalidArgumentError, match=">= 0"):
        backend.class_indices(np.array([-1, 2]), 10)


@pytest.mark.parametrize("order", [1, 2, np.inf])
def test_dual_norm_against_numpy(order):
    gradients = np.random.default_rng(1).normal(size=(4, 3, 2, 5)).astype("float32")
    expected = np.linalg.norm(gradients.reshape(4, -1), ord=order, axis=-1)
    np.testing.assert_allclose(distances.dual_norm(gradients, order), expected, rtol=1e-6)


def test_two_norm_has_a_finite_gradient_at_zero():
    zeros = tf.zeros((2, 3))
    with tf.GradientTape() as tape:
        tape.watch(zeros)
        norms = distances.dual_norm(zeros, 2)
    np.testing.assert_array_equal(tape.gradient(norms, zeros), np.zeros((2, 3)))


@pytest.mark.parametrize("aggregation", ["max", "sum"])
def test_hinge_terms_against_the_formula(aggregation):
    distances = np.array([[3.0, 0.5], [-10.0, 1.5], [0.2, -0.1]], "float32")
    gamma, alpha = 2.0, 3.0
    lower = gamma * (1 - alpha)

    def term(d):  # the authors' form, the hinge minus gamma, in float64
        return max(0.0, gamma - max(float(d), lower)) - gamma

    if aggregation == "max":
        expected = [term(min(row)) for row in distances]
    else:
        expected = [sum(term(d) for d in row) for row in distances]
    np.testing.assert_allclose(
        margin_lib.hinge_terms(distances, gamma, alpha, aggregation), expected
    )


def test_dual_norm_of_float16_gradients_does_not_overflow():
    # 10000 entries of 300: the squared sum (9e8) overflows float16.
    gradients = tf.fill([2, 100, 100], tf.constant(300.0, tf.float16))
    norms = distances.dual_norm(gradients, 2)
    assert norms.dtype == tf.float32
    np.testing.assert_allclose(norms, [30000.0, 30000.0], rtol=1e-6)


LAYER_NAMES = st.lists(
    st.sampled_from(["input", "conv", "dense", "block/dense", "logits"]),
    min_size=1,
    max_size=3,
    unique=True,
)
POSITIVE = st.floats(1e-6, 1e6, allow_nan=False)


@st.composite
def margin_configs(draw):
    layers = draw(LAYER_NAMES)
    per_layer = st.lists(POSITIVE, min_size=len(layers), max_size=len(layers))
    return dict(
        layers=layers,
        gamma=draw(POSITIVE | per_layer),
        norm=draw(st.sampled_from([1, 2, np.inf, "inf"])),
        top_k=draw(st.integers(1, 9)),
        aggregation=draw(st.sampled_from(["max", "sum"])),
        alpha=draw(POSITIVE),
        epsilon=draw(st.floats(0.0, 1.0)),
        approximate=draw(st.booleans()),
        layer_weights=draw(st.none() | per_layer),
        space=draw(st.sampled_from(["probabilities", "logits"])),
        weight=draw(st.floats(0.0, 1e3)),
        coupling=draw(st.sampled_from(["batch", "inference"])),
        competitors=draw(st.sampled_from(["top", "sampled"])),
        balance=draw(st.floats(0.0, 1e3)),
    )


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(margin_configs())
def test_every_valid_config_round_trips(config):
    margin = LargeMargin(**config)
    revived = assert_config_round_trip(margin)
    assert revived == margin
    assert LargeMargin.from_config(normalized(margin.get_config())) == margin


INVALID = {
    "gamma": st.floats(max_value=0.0) | st.just(float("inf")) | st.just(float("nan")),
    "norm": st.integers(3, 100) | st.sampled_from(["l2", "two", 0, -1, True]),
    "top_k": st.integers(max_value=0) | st.floats(1.5, 3.5) | st.just(True),
    "aggregation": st.text(max_size=8).filter(lambda text: text not in ("max", "sum")),
    "alpha": st.floats(max_value=0.0),
    "epsilon": st.floats(max_value=-1e-9),
    "layer_weights": st.lists(st.floats(max_value=0.0), min_size=1, max_size=1),
    "space": st.text(max_size=8).filter(lambda text: text not in ("probabilities", "logits")),
    "weight": st.floats(max_value=-1e-9),
    "coupling": st.text(max_size=8).filter(lambda text: text not in ("batch", "inference")),
    "competitors": st.text(max_size=8).filter(lambda text: text not in ("top", "sampled")),
    "balance": st.floats(max_value=-1e-9) | st.just(float("nan")) | st.just(True),
}


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(
    st.sampled_from(sorted(INVALID)).flatmap(lambda name: st.tuples(st.just(name), INVALID[name]))
)
def test_every_invalid_value_is_refused_by_name(argument):
    name, value = argument
    with pytest.raises(ValueError, match=re.escape(f"`{name}")):
        LargeMargin(["dense"], **{name: value})


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
    batch=st.integers(1, 12),
    classes=st.integers(2, 12),
    scale=st.floats(0.01, 8.0),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_balance_term_against_numpy(batch, classes, scale, weighted, seed):
    """Value and logit gradient of `balance_term` against the float64
    formula; float32 softmax and log keep about 1e-6 relative error."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(batch, classes))
    weights = rng.uniform(0.1, 2.0, size=batch) if weighted else np.ones(batch)
    expected_value, expected_gradient = balance_reference(logits, weights)
    z = tf.constant(logits, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = margin_lib.balance_term(z, "logits", weights if weighted else None)
    gradient = tape.gradient(value, z).numpy()
    np.testing.assert_allclose(value.numpy(), expected_value, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-3, atol=1e-6)
    probabilities = tf.nn.softmax(z)
    same = margin_lib.balance_term(probabilities, "probabilities", weights if weighted else None)
    np.testing.assert_allclose(same.numpy(), expected_value, rtol=1e-4, atol=1e-5)


def test_balance_term_is_zero_when_even_and_pushes_a_dominant_class_down():
    even = tf.zeros((4, 5))
    assert abs(float(margin_lib.balance_term(even, "logits"))) < 1e-6
    one_class = tf.constant([[4.0, 0.0, 0.0]] * 6)
    with tf.GradientTape() as tape:
        tape.watch(one_class)
        value = margin_lib.balance_term(one_class, "logits")
    gradient = tape.gradient(value, one_class).numpy()
    assert float(value) > 1.0
    # Gradient descent lowers the dominant class's logit, raises the others.
    assert np.all(gradient[:, 0] > 0) and np.all(gradient[:, 1:] < 0)


def test_another_keras_backend_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(
        ImportError, match=r"^marginfit runs on Keras' TensorFlow, JAX and PyTorch backends"
    ):
        importlib.reload(backend)
    monkeypatch.undo()
    importlib.reload(backend)
    assert backend.MarginTrainer.__module__ == "marginfit.backend.tensorflow.trainer"
