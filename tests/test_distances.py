"""What marginfit calls a distance is one: on a trained digits MLP, the
reported distances agree with the measured smallest perturbations that flip
the prediction (`attacks.minimal_perturbation`), and the violation rate is
the share of examples that close to a boundary."""

import keras
import numpy as np
import pytest
from helpers import CE
from sklearn.datasets import load_digits

from marginfit import LargeMargin, MarginModel, attacks

TRAIN = 1400
"""Training digits; the other 397 validate."""


def split():
    data = load_digits()
    x, y = (data.data / 16.0).astype("float32"), data.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:TRAIN], y[:TRAIN]), (x[TRAIN:], y[TRAIN:])


def trained_mlp(margin, data):
    """64 pixels -> 32 ReLUs ("hidden") -> 10 logits, Adam, 20 epochs."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    model = MarginModel(inputs, logits, margin=margin)
    model.compile("adam", CE, metrics=["accuracy"])
    (x, y), _ = data
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def data():
    return split()


@pytest.fixture(scope="module", params=["defaults", "cross-entropy"])
def trained(request, data):
    """A model trained with the default margin or with cross-entropy alone,
    and a `MarginModel` over its layers that reports the distances."""
    margin = LargeMargin(["input", "hidden"])
    model = trained_mlp(margin if request.param == "defaults" else None, data)
    reporting = model if request.param == "defaults" else MarginModel.wrap(model, margin)
    reporting.compile(loss=CE)
    return model, reporting


def median_of_correct(values, sizes):
    correct = (sizes > 0) & np.isfinite(sizes)
    return np.median(values[correct])


def test_input_distances_agree_with_the_measured_minimal_perturbation(trained, data):
    model, reporting = trained
    _, (x, y) = data
    sizes, _ = attacks.minimal_perturbation(model, x, y, norm=2)
    reported = reporting.margin_distances(x, y)["input"]
    ratio = median_of_correct(reported, sizes) / median_of_correct(sizes, sizes)
    assert 0.5 <= ratio <= 2, ratio
    # The log is the mean of the distances to the top competitor's boundary,
    # which agree too.
    logged = reporting.margin_distances(x, y, competitors=1)["input"]
    ratio = median_of_correct(logged, sizes) / median_of_correct(sizes, sizes)
    assert 0.5 <= ratio <= 2, ratio
    logs = reporting.evaluate(x, y, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["distance_input"], logged.mean(), rtol=1e-5)


def test_hidden_distances_are_exact_where_the_rest_is_linear(trained, data):
    """Above "hidden" the network is one Dense layer: the distance there is
    ``min_j (z_y - z_j) / ||W_y - W_j||_2``, in the units of the ReLUs, and
    the minimal perturbation of the activations measures the same."""
    model, reporting = trained
    _, (x, y) = data
    hidden = keras.Model(model.inputs, model.get_layer("hidden").output).predict(x, verbose=0)
    kernel, bias = model.get_layer("logits").get_weights()
    logits = hidden @ kernel + bias
    rows = np.arange(len(y))
    gaps = logits[rows, y][:, None] - logits
    sizes = np.linalg.norm(kernel.T[y][:, None, :] - kernel.T[None], axis=-1)
    expected = np.where(np.eye(10)[y] > 0, np.inf, gaps / np.where(sizes > 0, sizes, 1)).min(1)
    reported = reporting.margin_distances(x, y)["hidden"]
    np.testing.assert_allclose(reported, expected, rtol=1e-4, atol=1e-5)
    head = keras.Model(model.get_layer("hidden").output, model.outputs)
    measured, _ = attacks.minimal_perturbation(head, hidden, y, norm=2)
    ratio = median_of_correct(reported, measured) / median_of_correct(measured, measured)
    assert 0.5 <= ratio <= 2, ratio


def test_the_violation_rate_is_the_share_closer_than_gamma(data):
    """With gamma a distance in pixels (logit space), the validation
    violation rate is the share of validation digits whose measured minimal
    perturbation is below gamma (misclassified ones: 0)."""
    gamma = 0.5
    model = trained_mlp(LargeMargin(["input"], gamma=gamma, space="logits"), data)
    _, (x, y) = data
    rate = model.evaluate(x, y, return_dict=True, verbose=0)["violation_rate"]
    sizes, _ = attacks.minimal_perturbation(model, x, y, norm=2)
    share = np.mean(sizes < gamma)
    assert 0.1 < share < 0.9  # gamma is where the distances are
    assert abs(rate - share) <= 0.1, (rate, share)


def test_fewer_competitors_give_upper_bounds_and_bad_counts_are_refused():
    """On a linear model every competitor gives the exact distance; the top
    competitor's alone (the logs') is never nearer."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = MarginModel(inputs, keras.layers.Dense(4)(inputs), margin=LargeMargin(["input"]))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5)).astype("float32"), rng.integers(0, 4, 32)
    kernel, bias = model.get_weights()
    gaps = (x @ kernel + bias)[np.arange(32), y][:, None] - (x @ kernel + bias)
    sizes = np.linalg.norm(kernel.T[y][:, None, :] - kernel.T[None], axis=-1)
    exact = np.where(np.eye(4)[y] > 0, np.inf, gaps / np.where(sizes > 0, sizes, 1)).min(1)
    np.testing.assert_allclose(model.margin_distances(x, y)["input"], exact, rtol=1e-5)
    top = model.margin_distances(x, y, competitors=1)["input"]
    assert np.all(top >= exact - 1e-5 * np.abs(exact)) and np.any(top > exact + 1e-3)
    with pytest.raises(ValueError, match=r"^`competitors` must be an integer >= 1"):
        model.margin_distances(x, y, competitors=0)
