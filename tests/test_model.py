"""MarginModel against the naive per-example, per-class reference."""

import itertools

import hypothesis
import keras
import numpy as np
import pytest
import reference
from helpers import (
    CE,
    assert_logs_match_reference,
    conv_net,
    digits,
    margin_for,
    reference_gradients,
    reference_loss,
)
from hypothesis import strategies as st
from nets import STEP_GRID
from reference import balance_reference

from marginfit import LargeMargin, MarginModel


# `approximate` changes forward values only on the exact, "max", top_k > 1
# path (the nearest competitor's recorded pass); elsewhere it changes
# gradients alone, which the SGD-step tests below check.
@pytest.mark.parametrize(
    "norm, top_k, aggregation, approximate",
    [
        *itertools.product([1, 2, np.inf], [1, 3], ["max", "sum"], [True]),
        *itertools.product([1, 2, np.inf], [3], ["max"], [False]),
    ],
)
def test_evaluate_matches_naive_reference(norm, top_k, aggregation, approximate):
    margin = margin_for(norm, top_k=top_k, aggregation=aggregation, approximate=approximate)
    model, taps = conv_net(margin)
    model.compile(loss=CE)
    x, y = digits(20)
    # Batches of 8, 8 and 4: the logs are streaming means over examples.
    logs = model.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)
    expected_loss, _ = reference_loss(taps, x, y, margin)
    assert_logs_match_reference(logs, expected_loss, margin, taps, x, y)
    expected_ce = CE(y, taps(x)[0])
    np.testing.assert_allclose(logs["ce_loss"], expected_ce, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], logs["ce_loss"] + logs["margin_loss"], rtol=1e-5)


@pytest.mark.parametrize("space", ["probabilities", "logits"])
def test_layer_weights_sample_weights_and_one_hot_labels(space):
    margin = margin_for(2, top_k=2, layer_weights=[0.5, 2.0, 1.5], space=space)
    model, taps = conv_net(margin)
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x, y = digits(16)
    weights = np.linspace(0.0, 2.0, len(x)).astype("float32")
    logs = model.evaluate(
        x,
        np.eye(10)[y],
        sample_weight=weights,
        batch_size=16,
        return_dict=True,
        verbose=0,
    )
    expected_loss, _ = reference_loss(taps, x, y, margin, sample_weight=weights)
    assert_logs_match_reference(logs, expected_loss, margin, taps, x, y, weights)


@pytest.mark.parametrize("weighted", [False, True])
def test_class_balance_term_adds_to_the_margin_loss(weighted):
    """With ``balance=b`` the margin loss is the reference hinge loss plus
    b * KL(uniform || batch-mean prediction), computed here in float64."""
    balance = 0.7
    margin = margin_for(2, balance=balance)
    model, taps = conv_net(margin)
    model.compile(loss=CE)
    x, y = digits(16)
    weights = np.linspace(0.1, 2.0, len(x)).astype("float32") if weighted else None
    logs = model.evaluate(x, y, sample_weight=weights, batch_size=16, return_dict=True, verbose=0)
    hinge, _ = reference_loss(taps, x, y, margin, sample_weight=weights)
    logits = np.asarray(taps(x)[0], dtype="float64")
    term, _ = balance_reference(logits, np.ones(len(x)) if weights is None else weights)
    np.testing.assert_allclose(logs["margin_loss"], float(hinge) + balance * term, rtol=1e-5)


def test_probability_outputs_give_the_same_margin_as_logits():
    x, y = digits(12)
    for space in ("probabilities", "logits"):
        margin = margin_for(2, top_k=2, space=space)
        results = []
        for output in ("logits", "probabilities"):
            model, _ = conv_net(margin, output=output)
            model.compile(loss=None)
            results.append(model.evaluate(x, y, return_dict=True, verbose=0))
        for key in ("margin_loss", "distance_input", "distance_dense"):
            np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-4)


def sgd_step(margin, x, y, learning_rate=0.5, loss=CE, **fit_options):
    """Weights before, weights after one SGD step of fit(), and the model."""
    model, taps = conv_net(margin)
    model.compile(keras.optimizers.SGD(learning_rate), loss=loss)
    before = [w.numpy() for w in model.trainable_weights]
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, **fit_options)
    after = [w.numpy() for w in model.trainable_weights]
    return model, taps, before, after


@pytest.mark.parametrize("approximate, norm, aggregation", STEP_GRID)
def test_one_sgd_step_follows_the_reference_gradient(approximate, norm, aggregation):
    margin = margin_for(norm, top_k=2, aggregation=aggregation, approximate=approximate)
    x, y = digits(8)
    learning_rate = 0.5
    model, taps, before, after = sgd_step(margin, x, y, learning_rate)
    # The reference runs on a fresh copy of the initial weights.
    fresh, fresh_taps = conv_net(margin)
    expected = reference_gradients(fresh, fresh_taps, x, y, margin)
    for w0, w1, g in zip(before, after, expected):
        np.testing.assert_allclose(w1 - w0, -learning_rate * g, rtol=2e-4, atol=2e-7)
    # The exact and approximate gradients differ well beyond that tolerance,
    # so this test tells them apart.
    other = margin_for(norm, top_k=2, aggregation=aggregation, approximate=not approximate)
    other_gradients = reference_gradients(fresh, fresh_taps, x, y, other)
    assert (
        max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(expected, other_gradients)) > 1e-2
    )


def test_margin_only_training_with_loss_none():
    margin = margin_for(2, weight=2.0)
    x, y = digits(8)
    model, taps, before, after = sgd_step(margin, x, y, 0.5, loss=None)
    fresh, fresh_taps = conv_net(margin)
    expected = reference_gradients(fresh, fresh_taps, x, y, margin, ce_weight=0.0)
    for w0, w1, g in zip(before, after, expected):
        np.testing.assert_allclose(w1 - w0, -0.5 * g, rtol=2e-4, atol=2e-7)
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    assert "ce_loss" not in logs  # nothing but the margin to compute
    np.testing.assert_allclose(logs["loss"], 2.0 * logs["margin_loss"], rtol=1e-6)


def test_class_weight_equals_the_matching_sample_weight():
    margin = margin_for(2, top_k=2)
    x, y = digits(16)
    class_weight = {c: 0.5 + 0.1 * c for c in range(10)}
    sample_weight = np.array([class_weight[c] for c in y], "float32")
    _, _, _, by_class = sgd_step(margin, x, y, class_weight=class_weight)
    _, _, _, by_sample = sgd_step(margin, x, y, sample_weight=sample_weight)
    _, _, _, unweighted = sgd_step(margin, x, y)
    for a, b in zip(by_class, by_sample):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(by_class, unweighted))


def test_training_logs_are_streaming_means_over_the_epoch():
    margin = margin_for(2, top_k=3, aggregation="sum")
    model, taps = conv_net(margin)
    model.compile(keras.optimizers.SGD(0.0), loss=CE)  # weights stay put
    x, y = digits(20)
    history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    logs = {key: values[-1] for key, values in history.history.items()}
    expected_loss, _ = reference_loss(taps, x, y, margin, training=True)
    np.testing.assert_allclose(logs["margin_loss"], float(expected_loss), rtol=1e-5)
    np.testing.assert_allclose(logs["ce_loss"], CE(y, taps(x)[0]), rtol=1e-5)
    # Distances are measured in evaluation (inference mode) only.
    assert not [key for key in logs if key.startswith("distance_") or key == "violation_rate"]


def test_regularization_losses_are_part_of_the_loss():
    margin = margin_for(2)
    model, taps = conv_net(margin, regularizer=keras.regularizers.L2(0.1))
    model.compile(loss=CE)
    x, y = digits(8)
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    regularization = float(np.sum([float(loss) for loss in model.losses]))
    assert regularization > 1e-3
    # ce_loss is Keras' loss without the margin: compiled + regularization.
    np.testing.assert_allclose(
        logs["ce_loss"], float(CE(y, taps(x)[0])) + regularization, rtol=1e-5
    )
    np.testing.assert_allclose(logs["loss"], logs["ce_loss"] + logs["margin_loss"], rtol=1e-5)


def test_predict_is_the_plain_forward_pass():
    model, taps = conv_net(margin_for(2))
    x, _ = digits(8)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), taps.predict(x, verbose=0)[0], rtol=1e-6
    )


def test_xla_step_equals_the_graph_step():
    margin = margin_for(2, top_k=2, approximate=False)
    x, y = digits(8)
    _, _, _, graph = sgd_step(margin, x, y)
    model, _ = conv_net(margin)
    model.compile(keras.optimizers.SGD(0.5), loss=CE, jit_compile=True)
    assert model.jit_compile
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(graph, model.trainable_weights):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


def test_mixed_precision_matches_float32():
    margin = margin_for(2, top_k=2)
    x, y = digits(16)
    model, _ = conv_net(margin)
    model.compile(loss=CE)
    expected = model.evaluate(x, y, return_dict=True, verbose=0)
    weights = model.get_weights()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed, _ = conv_net(margin)
        assert mixed.get_layer("conv").compute_dtype == "float16"
        mixed.set_weights(weights)
        mixed.compile(keras.optimizers.SGD(0.1), loss=CE)
        logs = mixed.evaluate(x, y, return_dict=True, verbose=0)
        history = mixed.fit(x, y, batch_size=8, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for key in ("margin_loss", "distance_input", "distance_conv", "distance_dense"):
        np.testing.assert_allclose(logs[key], expected[key], rtol=2e-2, err_msg=key)
    assert all(np.isfinite(values).all() for values in history.history.values())
    assert all(np.isfinite(w).all() for w in mixed.get_weights())


def test_a_compute_loss_override_is_honoured():
    class TripleLoss(MarginModel):
        def compute_loss(self, x, y, y_pred, sample_weight=None, training=True):
            return 3.0 * super().compute_loss(x, y, y_pred, sample_weight, training)

    margin = margin_for(2)
    _, taps = conv_net(margin)
    model = TripleLoss(taps.inputs, taps.outputs[0], margin=margin)
    model.compile(keras.optimizers.SGD(0.0), loss=CE)
    x, y = digits(8)
    expected_ce = 3.0 * float(CE(y, taps(x)[0]))
    expected_margin, _ = reference_loss(taps, x, y, margin)
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    for loss in (logs["loss"], history["loss"][0]):
        np.testing.assert_allclose(loss, expected_ce + float(expected_margin), rtol=1e-5)
    np.testing.assert_allclose(logs["ce_loss"], expected_ce, rtol=1e-5)


def test_sampled_competitors_against_the_reference():
    x, y = digits(16)
    # Sampling every other class and summing is the full sum, in any order.
    every = margin_for(2, top_k=9, aggregation="sum", competitors="sampled")
    model, taps = conv_net(every)
    model.compile(keras.optimizers.SGD(0.0), loss=CE)
    expected_loss, _ = reference_loss(taps, x, y, margin_for(2, top_k=9, aggregation="sum"))
    logs = model.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["margin_loss"], float(expected_loss), rtol=1e-5)
    history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    np.testing.assert_allclose(history["margin_loss"][0], float(expected_loss), rtol=1e-5)
    # One sampled competitor: each step's loss is that of a random other
    # class, at most that of each example's nearest boundary.
    one = margin_for(2, competitors="sampled")
    model, taps = conv_net(one)
    model.compile(keras.optimizers.SGD(0.0), loss=CE)
    nearest, _ = reference_loss(taps, x, y, margin_for(2, top_k=9))
    total, _ = reference_loss(taps, x, y, margin_for(2, top_k=9, aggregation="sum"))
    losses = [
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0).history["margin_loss"][0]
        for _ in range(40)
    ]
    assert all(loss <= float(nearest) * (1 + 1e-5) for loss in losses)
    # Unbiased: the mean over steps is the mean over competitors, sum / 9,
    # within 5 standard errors of the steps' spread.
    spread = np.std(losses) / np.sqrt(len(losses))
    assert abs(np.mean(losses) - float(total) / 9) < 5 * spread + 1e-6
    assert spread > 0  # the competitors really vary between steps


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(
    features=st.integers(2, 6),
    widths=st.lists(st.integers(2, 8), min_size=1, max_size=2),
    classes=st.integers(3, 5),
    norm=st.sampled_from([1, 2, np.inf]),
    top_k=st.integers(1, 2),
    aggregation=st.sampled_from(["max", "sum"]),
    on_input=st.booleans(),
    gamma=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_random_small_models_agree_with_the_reference(
    features, widths, classes, norm, top_k, aggregation, on_input, gamma, seed
):
    """Random MLPs (tanh, so that no gradient is exactly zero) and margins:
    evaluate() gives the naive per-example loss and distances."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    hidden, x = [], inputs
    for i, width in enumerate(widths):
        x = keras.layers.Dense(width, activation="tanh", name=f"h{i}")(x)
        hidden.append(x)
    logits = keras.layers.Dense(classes, name="logits")(x)
    layers = (["input"] if on_input else []) + [f"h{i}" for i in range(len(widths))]
    margin = LargeMargin(
        layers,
        gamma=gamma,
        norm=norm,
        top_k=top_k,
        aggregation=aggregation,
        alpha=2.0,
        competitors="top",
        balance=0.0,
    )
    model = MarginModel(inputs, logits, margin=margin)
    model.compile(loss=None)
    taps = keras.Model(inputs, [logits, *hidden])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(7, features)).astype("float32")
    y = rng.integers(0, classes, 7)
    logs = model.evaluate(x, y, batch_size=7, return_dict=True, verbose=0)
    config = margin.get_config()
    expected, _ = reference.margin_loss(
        taps,
        x,
        y,
        gamma=config["gamma"],
        alpha=config["alpha"],
        aggregation=aggregation,
        layers=layers,
        norm=margin.norm,
        top_k=top_k,
    )
    np.testing.assert_allclose(logs["margin_loss"], float(expected), rtol=1e-5, atol=1e-7)
    nearest = reference.boundary_distances(
        taps, x, y, layers=layers, norm=margin.norm, competitors=1
    )
    for name, distances in zip(layers, nearest):
        np.testing.assert_allclose(logs[f"distance_{name}"], distances.mean(), rtol=1e-4, atol=1e-6)
