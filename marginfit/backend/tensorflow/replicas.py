"""The global batch seen from one replica, so that the default loss is the
same function of the global batch on one device and on N replicas or
workers (`tf.distribute`).

Keras sums the replicas' gradients of their per-replica losses, which is
exact for a mean over examples. Two parts of the default margin loss are
not such a mean: the class-balance term is a nonlinear function of the
batch-mean prediction, and sampled competitors are drawn by each example's
index in the global batch (`marginfit.draws`). `GlobalBatch` gives both
what they need in one all-reduce per step: sums over the global batch, and
this replica's offset in it.
"""

import tensorflow as tf


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
        dtype = tf.float32 if sums is None else sums.dtype
        parts = [] if sums is None else [sums]
        replicas = context.num_replicas_in_sync
        replica = context.replica_id_in_sync_group
        if positions:
            # This replica's batch size at its id: summed, every replica's.
            parts.append(tf.one_hot(replica, replicas, dtype=dtype) * tf.cast(batch_size, dtype))
        reduced = context.all_reduce("sum", tf.stop_gradient(tf.concat(parts, axis=0)))
        if sums is not None:
            self.sums = reduced[: sums.shape[0]] + replicas * (sums - tf.stop_gradient(sums))
        if positions:
            sizes = reduced[-replicas:]
            earlier = tf.range(replicas) < replica
            self.offset = tf.cast(tf.reduce_sum(tf.where(earlier, sizes, 0.0)), tf.int64)


def summed(tensors):
    """``tensors`` (a list; None entries kept) summed over the replicas of a
    step; themselves on one device."""
    context = _replica_context()
    present = [t for t in tensors if t is not None]
    if context is None or not present:
        return list(tensors)
    reduced = iter(context.all_reduce("sum", present))
    return [None if t is None else next(reduced) for t in tensors]


def replicas_in_sync():
    """The number of replicas whose gradients Keras sums in a step."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def global_batch(batch_size, sums=None, positions=False):
    """The `GlobalBatch` of this replica."""
    return GlobalBatch(batch_size, sums, positions)
