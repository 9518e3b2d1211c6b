"""The custom components people learn to write, where Keras' own falls short."""

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip

import marginfit

RNG = np.random.default_rng(0)


def huber_reference(y_true, y_pred, threshold):
    error = y_true - y_pred
    small = np.abs(error) <= threshold
    per_element = np.where(small, error**2 / 2, threshold * np.abs(error) - threshold**2 / 2)
    return per_element.mean(axis=-1)


def test_huber_loss_math_and_weights():
    y_true = RNG.normal(size=(6, 3)).astype("float32") * 3
    y_pred = RNG.normal(size=(6, 3)).astype("float32")
    weights = np.linspace(0.5, 2.0, 6).astype("float32")
    loss = marginfit.HuberLoss(threshold=1.5)
    expected = huber_reference(y_true, y_pred, 1.5)
    # Both branches occur.
    assert 0 < np.mean(np.abs(y_true - y_pred) <= 1.5) < 1
    np.testing.assert_allclose(loss(y_true, y_pred), expected.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        loss(y_true, y_pred, sample_weight=weights), (weights * expected).mean(), rtol=1e-6
    )
    with pytest.raises(ValueError, match="positive"):
        marginfit.HuberLoss(threshold=0.0)


def test_huber_loss_keeps_its_threshold_where_keras_huber_loses_it():
    y_true, y_pred = np.array([[0.0]]), np.array([[2.0]])
    revived = assert_config_round_trip(marginfit.HuberLoss(threshold=2.5))
    assert revived.threshold == 2.5
    assert float(revived(y_true, y_pred)) == pytest.approx(2.0)  # e**2 / 2 below 2.5
    # Keras' Huber before 3.16 drops `delta` from its config: reloaded, it
    # is back to 1 (3.16 keeps it).
    keras_revived = keras.losses.Huber.from_config(keras.losses.Huber(delta=2.5).get_config())
    kept = float(keras_revived(y_true, y_pred)) == pytest.approx(2.0)
    assert kept == ("delta" in keras.losses.Huber(delta=2.5).get_config())


def test_violation_rate_streams_weighted_counts():
    rate = marginfit.ViolationRate(gamma=[1.0, 0.5])
    # [batch, layers] distances; a row violates if any column is below gamma.
    first = np.array([[2.0, 0.6], [0.9, 0.6], [2.0, 0.1]], "float32")
    second = np.array([[2.0, 0.7], [0.5, 0.1]], "float32")
    rate.update_state(first, sample_weight=[1.0, 2.0, 3.0])
    rate.update_state(second)
    violated = [False, True, True, False, True]
    weights = np.array([1.0, 2.0, 3.0, 1.0, 1.0])
    np.testing.assert_allclose(
        rate.result(), np.sum(weights * violated) / np.sum(weights), rtol=1e-6
    )
    rate.reset_state()
    assert float(rate.result()) == 0.0
    revived = assert_config_round_trip(rate)
    assert revived.gamma == (1.0, 0.5)


def test_backtracking_sgd_config_round_trip():
    optimizer = marginfit.BacktrackingSGD(0.03, clipnorm=2.0, name="head")
    revived = assert_config_round_trip(optimizer)
    assert revived.name == "head" and revived.clipnorm == 2.0
    np.testing.assert_allclose(float(revived.learning_rate), 0.03, rtol=1e-6)
