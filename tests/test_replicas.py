"""What one replica knows of the global batch (`marginfit.replicas`), on one
device; several replicas are tested in `distributed_fit.py` and
`multi_worker_fit.py`."""

import numpy as np
import pytest
import tensorflow as tf

from marginfit import replicas

SEED = tf.constant([0x5EED, 7], tf.int64)


@pytest.mark.parametrize("width", [1, 3, 10, 12])
def test_uniform_rows_are_the_rows_of_one_draw_of_the_global_batch(width):
    """Rows offset..offset+b-1 equal those of `tf.random.stateless_uniform`
    over the whole batch, for every offset and row width (also where a row
    starts inside a Philox block of 4 numbers)."""
    whole = tf.random.stateless_uniform([40, width], seed=SEED).numpy()
    for offset in range(0, 33):
        rows = replicas.uniform_rows(7, width, SEED, tf.constant(offset, tf.int64))
        np.testing.assert_array_equal(rows.numpy(), whole[offset : offset + 7])


def test_one_device_communicates_nothing():
    sums = tf.constant([1.0, 2.0, 3.0])
    batch = replicas.GlobalBatch(5, sums, positions=True)
    assert batch.sums is sums
    assert int(batch.offset) == 0
