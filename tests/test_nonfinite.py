"""A step whose loss or gradient is not finite changes nothing: the weights
and optimizer state after a poisoned batch are those before it, bit for bit.

Arrays with NaN are refused at fit() entry (tests/test_checks.py); a
dataset is checked by its first batch, so later batches reach the step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import CE, conv_net, digits
from hypothesis import given, settings
from hypothesis import strategies as st

from marginfit import LargeMargin
from marginfit.backend.tensorflow import updates

BATCH = 8
X, Y = digits(3 * BATCH)
# Top-scoring competitors: sampled ones would be drawn anew in the skipped
# step too, so that the steps after it draw other competitors.
MARGIN = LargeMargin(["input", "dense"], gamma=0.2, alpha=2.0, competitors="top")


FAULTS = [np.nan, np.inf, -np.inf]


def poisoned(x, batch):
    """``x`` with one NaN pixel in the given batch (0-based)."""
    x = x.copy()
    x[batch * BATCH + 2, 3, 3, 0] = np.nan
    return x


def fit(x, y, policy="skip", callbacks=(), ema_momentum=None):
    """A fresh conv_net fitted for one epoch on ``x``, ``y`` in batches; with
    Keras' moving average of the weights if ``ema_momentum`` is given."""
    model, _ = conv_net(MARGIN, on_nonfinite=policy)
    averaging = {} if ema_momentum is None else {"use_ema": True, "ema_momentum": ema_momentum}
    model.compile(keras.optimizers.Adam(0.01, **averaging), loss=CE)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    history = model.fit(data, epochs=1, verbose=0, callbacks=list(callbacks))
    return model, history.history


def state(model):
    """Weights and optimizer variables (moments, iteration count, weight
    averages)."""
    return [v.numpy() for v in model.weights + model.optimizer.variables]


def assert_same_state(a, b):
    for left, right in zip(state(a), state(b), strict=True):
        np.testing.assert_array_equal(left, right)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("ema_momentum", [None, 0.5])
def test_a_poisoned_batch_is_skipped_and_training_goes_on(batch, ema_momentum):
    model, logs = fit(poisoned(X, batch), Y, ema_momentum=ema_momentum)
    keep = np.arange(len(X)) // BATCH != batch
    clean, _ = fit(X[keep], Y[keep], ema_momentum=ema_momentum)
    assert logs["nonfinite_steps"] == [1.0]
    assert int(model.optimizer.iterations) == 2
    if ema_momentum is not None:  # the average is among the state compared
        assert len(model.optimizer._model_variables_moving_average) == len(model.trainable_weights)
    assert_same_state(model, clean)


def test_raise_stops_fit_naming_the_batch_with_the_weights_before_it():
    model, _ = conv_net(MARGIN, on_nonfinite="raise")
    model.compile(keras.optimizers.Adam(0.01), loss=CE)
    data = tf.data.Dataset.from_tensor_slices((poisoned(X, 1), Y)).batch(BATCH)
    with pytest.raises(FloatingPointError, match=r"^Epoch 1, batch 2: the loss or a gradient"):
        model.fit(data, epochs=1, verbose=0)
    first, _ = fit(X[:BATCH], Y[:BATCH])
    assert_same_state(model, first)


def test_terminate_on_nan_still_stops_training():
    # conv_net's tanh passes the NaN on to the loss.
    model, logs = fit(poisoned(X, 1), Y, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert int(model.optimizer.iterations) == 1
    first, _ = fit(X[:BATCH], Y[:BATCH])
    assert_same_state(model, first)


def test_apply_updates_like_plain_keras():
    model, logs = fit(poisoned(X, 1), Y, policy="apply")
    assert "nonfinite_steps" not in logs
    assert not all(np.isfinite(w).all() for w in model.get_weights())


def test_evaluation_logs_leave_the_count_out():
    model, _ = conv_net(MARGIN)
    model.compile("adam", loss=CE)
    logs = model.evaluate(X, Y, return_dict=True, verbose=0)
    assert "nonfinite_steps" not in logs


def test_unknown_policy_is_refused_and_the_policy_round_trips():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        conv_net(MARGIN, on_nonfinite="ignore")
    model, _ = conv_net(MARGIN, on_nonfinite="raise")
    assert model.get_config()["on_nonfinite"] == "raise"
    revived = type(model).from_config(model.get_config())
    assert revived.on_nonfinite == "raise"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shapes=st.lists(st.sampled_from([(), (1,), (3, 4), (17,), (2, 3, 5)]), min_size=1, max_size=4),
    poison=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 59), st.sampled_from(FAULTS))),
    dtype=st.sampled_from(["float32", "float16", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_all_finite_agrees_with_numpy(shapes, poison, dtype, seed):
    """The one-pass sum check against numpy's elementwise `isfinite`, with
    NaN, +inf and -inf (also both infinities at once) at random places."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(scale=1e3, size=shape).astype(dtype) for shape in shapes]
    for tensor, position, value in poison:
        if tensor < len(arrays) and arrays[tensor].size:
            arrays[tensor].flat[position % arrays[tensor].size] = value
    expected = all(np.all(np.isfinite(a)) for a in arrays)
    assert bool(updates.all_finite([tf.constant(a) for a in arrays])) == expected


def test_all_finite_reads_the_values_of_indexed_slices():
    values = tf.constant([[1.0, np.inf]])
    sparse = tf.IndexedSlices(values, indices=tf.constant([3]), dense_shape=tf.constant([10, 2]))
    assert not bool(updates.all_finite([tf.constant(1.0), sparse, None]))
    assert bool(updates.all_finite([tf.IndexedSlices(values[:, :1], sparse.indices)]))
