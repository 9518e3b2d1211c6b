"""The counter-based draws (`marginfit.draws`) against a numpy uint32
reference of the mixer, and what one replica knows of the global batch
(`marginfit.backend.tensorflow.replicas`) on one device; several replicas
are tested in `distributed_fit.py` and `multi_worker_fit.py`, and the same
draws on JAX and PyTorch in `test_backends.py`."""

import numpy as np
import pytest
import tensorflow as tf

from marginfit import draws
from marginfit.backend.tensorflow import replicas


def reference_uniform(*words):
    """`draws.uniform` in numpy uint32 arithmetic (which wraps by definition),
    from Wellons' lowbias32 as published."""

    def mix(x):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
        return x

    with np.errstate(over="ignore"):
        state = np.uint32(0x9E3779B9)
        for word in np.broadcast_arrays(*[np.asarray(w, np.int64) for w in words]):
            state = mix(state ^ (word % 2**32).astype(np.uint32))
    return (state >> np.uint32(8)).astype(np.float64) * 2.0**-24


@pytest.mark.parametrize("step, offset", [(0, 0), (1, 0), (7, 5), (123456, 70000)])
def test_competitor_keys_are_the_hash_of_step_index_and_class(step, offset):
    keys = draws.competitor_keys(tf.constant(step, tf.int64), offset, 6, 10).numpy()
    rows = np.arange(6)[:, None] + offset
    expected = reference_uniform(draws.COMPETITORS, step, rows, np.arange(10)[None, :])
    np.testing.assert_array_equal(keys, expected.astype(np.float32))
    # Compiled by XLA, the same numbers.
    compiled = tf.function(draws.competitor_keys, jit_compile=True)
    np.testing.assert_array_equal(compiled(tf.constant(step), offset, 6, 10).numpy(), keys)


def test_a_row_depends_on_the_global_index_only():
    whole = draws.competitor_keys(3, 0, 40, 7).numpy()
    for offset in (0, 1, 13, 33):
        np.testing.assert_array_equal(
            draws.competitor_keys(3, offset, 7, 7).numpy(), whole[offset : offset + 7]
        )


def test_draws_are_uniform_and_vary_with_every_coordinate():
    values = draws.uniform(1, 2, np.arange(20000)).numpy()
    counts, _ = np.histogram(values, bins=20, range=(0, 1))
    expected = len(values) / 20
    chi_square = np.sum((counts - expected) ** 2 / expected)
    assert chi_square < 43.8  # the 99.9th percentile of chi-square with 19 degrees
    assert values.min() >= 0 and values.max() < 1
    base = draws.uniform(1, 2, 3).numpy()
    for other in [(0, 2, 3), (1, 1, 3), (1, 2, 4)]:
        assert draws.uniform(*other).numpy() != base


def test_normal_draws_are_box_muller_of_two_uniform_draws():
    x = np.zeros((50, 40), "float32")
    values = draws.normal_like(x, 9, 4).numpy()
    index = np.arange(x.size).reshape(x.shape)
    first, second = reference_uniform(9, 4, index, 0), reference_uniform(9, 4, index, 1)
    expected = np.sqrt(-2 * np.log(1 - first)) * np.cos(2 * np.pi * second)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    # Standard normal: the mean and variance within 5 standard errors.
    assert abs(values.mean()) < 5 / np.sqrt(x.size)
    assert abs(values.var() - 1) < 5 * np.sqrt(2 / x.size)


def test_one_device_communicates_nothing():
    sums = tf.constant([1.0, 2.0, 3.0])
    batch = replicas.GlobalBatch(5, sums, positions=True)
    assert batch.sums is sums
    assert int(batch.offset) == 0
