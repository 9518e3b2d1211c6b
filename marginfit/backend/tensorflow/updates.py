"""Weight updates that never apply a non-finite gradient.

A step whose loss or any gradient holds NaN or inf (an exploding margin
term, a float16 overflow, a bad batch) leaves the weights and the optimizer
state exactly as they were: the update is skipped on every replica at once.
"""

import tensorflow as tf


def all_finite(tensors):
    """Scalar bool: every element of every tensor is finite, on every replica.

    One pass over each tensor: its float32 sum is NaN or inf where any
    element is. The sum can also overflow, which takes elements of about
    ``3e38 / size``; such a step is reported as non-finite too.

    Args:
        tensors: Float tensors or `tf.IndexedSlices` (None entries are
            ignored), e.g. the loss and the gradients of one replica.
    """
    sums = [
        tf.reduce_sum(tf.cast(t.values if isinstance(t, tf.IndexedSlices) else t, tf.float32))
        for t in tensors
        if t is not None
    ]
    finite = tf.math.is_finite(tf.add_n(sums)) if sums else tf.constant(True)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        # The replicas share one update, so they must agree on skipping it.
        bad_replicas = context.all_reduce("sum", tf.cast(tf.logical_not(finite), tf.float32))
        finite = tf.equal(bad_replicas, 0.0)
    return finite


def apply_if(condition, apply, args=()):
    """Runs ``apply(*args)`` (which updates variables) only where ``condition``.

    Called in a replica context, as `train_step` is. Where the distribution
    strategy needs a merge call to update variables (`apply_gradients` makes
    one), the condition is taken in the cross-replica context, which a
    conditional around a merge call requires, and each replica applies its
    own ``args``.

    Args:
        condition: Scalar bool tensor, equal on every replica.
        apply: Callable that applies the update; it must reach replica-local
            values (e.g. gradients) only through ``args``.
        args: Tuple of (nests of) tensors passed to ``apply``.
    """
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(condition, lambda: _without_result(apply, *args), lambda: None)
        return

    def cross_replica(strategy, condition, *args):
        condition = strategy.experimental_local_results(condition)[0]

        def update():
            strategy.extended.call_for_each_replica(_without_result, (apply, *args))

        tf.cond(condition, update, lambda: None)

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(condition, *args))


def _without_result(function, *args):
    function(*args)
