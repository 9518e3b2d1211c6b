"""The global batch seen from one replica, so that the default loss is the
same function of the global batch on one device and on N replicas or
workers (`tf.distribute`).

Keras sums the replicas' gradients of their per-replica losses, which is
exact for a mean over examples. Two parts of the default margin loss are
not such a mean: the class-balance term is a nonlinear function of the
batch-mean prediction, and sampled competitors are drawn by position in the
batch. `GlobalBatch` gives both what they need in one all-reduce per step:
sums over the global batch, and this replica's offset in it.
"""

import tensorflow as tf

_PHILOX = 1
"""`tf.random.Algorithm.PHILOX`, the generator that ``alg="auto_select"``
picks on CPUs and GPUs."""
_PER_COUNTER = 4
"""Philox makes 4 uniform float32 numbers per 128-bit counter value."""


def _replica_context():
    """The replica context of a step with several replicas, else None (one
    device, or the cross-replica context where callbacks run)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


class GlobalBatch:
    """One replica's view of the global batch of a step.

    With several replicas, every quantity asked for is reduced in one
    all-reduce, a sum over the replicas; on one device nothing is
    communicated. The sums are differentiable without a second all-reduce in
    the backward pass: each replica's loss holds ``1 / replicas`` of a term of
    the global sums and Keras adds the replicas' gradients, so the gradient
    of the global sums with respect to this replica's own sums is taken as
    ``replicas`` times the identity, which adds up to the exact gradient.

    Args:
        batch_size: Scalar int, this replica's number of examples.
        sums: Optional ``[n]`` float32 tensor of sums over this replica's
            examples, to be summed over the replicas.
        positions: Whether to find this replica's offset in the global batch.

    Attributes:
        sums: ``[n]`` float32 sums over the global batch (None without
            ``sums``).
        offset: Scalar int64, the global batch index of this replica's
            first example: 0 on one device, and for the replicas after the
            first the sum of the earlier replicas' batch sizes (replica ids
            follow the order of the global batch, as `tf.distribute` splits
            it).
    """

    def __init__(self, batch_size, sums=None, positions=False):
        context = _replica_context()
        self.sums = sums
        self.offset = tf.zeros((), tf.int64)
        if context is None or (sums is None and not positions):
            return
        parts = [] if sums is None else [tf.cast(sums, tf.float32)]
        replicas = context.num_replicas_in_sync
        replica = context.replica_id_in_sync_group
        if positions:
            # This replica's batch size at its id: summed, every replica's.
            parts.append(tf.one_hot(replica, replicas) * tf.cast(batch_size, tf.float32))
        reduced = context.all_reduce("sum", tf.stop_gradient(tf.concat(parts, axis=0)))
        if sums is not None:
            local = tf.cast(sums, tf.float32)
            self.sums = reduced[: sums.shape[0]] + replicas * (local - tf.stop_gradient(local))
        if positions:
            sizes = reduced[-replicas:]
            earlier = tf.range(replicas) < replica
            self.offset = tf.cast(tf.reduce_sum(tf.where(earlier, sizes, 0.0)), tf.int64)


def uniform_rows(batch_size, width, seed, offset):
    """Rows ``offset .. offset + batch_size - 1`` of
    ``tf.random.stateless_uniform([n, width], seed)`` (any ``n`` beyond them).

    Row ``i`` of that tensor depends on ``i`` only, not on ``n``: Philox
    fills it from counter ``i * width / 4`` on. Starting the counter there
    gives a replica its examples' rows without drawing the earlier
    replicas' (static shapes, so also under XLA, whose generator lays out
    its numbers differently).

    Args:
        batch_size: Scalar int, the number of rows.
        width: Python int, the row length.
        seed: ``[2]`` int seed, as for `tf.random.stateless_uniform`.
        offset: Scalar int64, the index of the first row.

    Returns:
        ``[batch_size, width]`` float32 in [0, 1).
    """
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.cast(seed, tf.int64))
    start = offset * width
    # Added to the low 64 bits of the counter; a carry into the high ones
    # (chance below 2**-24 for any start below 2**40) is left out.
    skip = tf.stack([start // _PER_COUNTER, tf.zeros((), tf.int64)])
    counter = tf.bitcast(tf.bitcast(counter, tf.int64) + skip, tf.uint64)
    count = tf.cast(batch_size, tf.int64) * width
    numbers = tf.raw_ops.StatelessRandomUniformV2(
        shape=tf.reshape(count + _PER_COUNTER - 1, [1]),
        key=key,
        counter=counter,
        alg=_PHILOX,
        dtype=tf.float32,
    )
    numbers = tf.slice(numbers, tf.reshape(start % _PER_COUNTER, [1]), tf.reshape(count, [1]))
    return tf.reshape(numbers, [-1, width])
