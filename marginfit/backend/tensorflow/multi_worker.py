"""What `MarginModel` does so that `fit()`/`evaluate()` run under
`tf.distribute.MultiWorkerMirroredStrategy`, where Keras' own TensorFlow
trainer fails for every model (Keras 3.15; keras-team/keras#20585,
tensorflow/tensorflow#72388):

1. Before the first step, ``TensorFlowTrainer._maybe_symbolic_build``
   averages the first distributed batch with ``strategy.reduce(..., axis=None)``,
   which multi-worker strategies refuse ("Attempt to convert a value
   (PerReplica..."). `symbolic_build` retries with this worker's first
   replica's batch: the build only needs shapes and dtypes.
2. ``reduce_per_replica`` reduces the logs of each step with
   ``strategy.reduce("MEAN", v, axis=0)``, which fails for the scalar logs
   that every `train_step` returns ("Invalid reduction dimension 0").
   Where `needs_vector_logs`, `step_logs` gives each log the shape ``[1]``,
   so that the reduction averages the replicas' values into a scalar, as it
   does on one worker.

Both apply only to models of this library, only in multi-worker mode, and
only while Keras still fails: (1) is tried after Keras' own build raised,
and (2) after a traced probe of Keras' reduction raised. Once Keras is
fixed, neither changes anything.
"""

import tensorflow as tf

from marginfit import _keras_internals

_REDUCTION_FAILS = {}


def in_multi_worker_mode(strategy):
    """Whether ``strategy`` spans several workers (collective all-reduce)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs) > 1


def symbolic_build(model, iterator, error):
    """Builds ``model`` from this worker's first batch after Keras' own
    symbolic build raised ``error``; re-raises it when the failure is not
    the multi-worker reduction of the batch."""
    strategy = model.distribute_strategy
    if not (in_multi_worker_mode(strategy) and "PerReplica" in str(error)):
        raise error
    for _, _, batches in iterator:
        batch = tf.nest.map_structure(
            lambda value: (
                strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues)
                else value
            ),
            next(batches),
        )
        break
    with strategy.scope():
        model._symbolic_build(data_batch=batch)


def needs_vector_logs(strategy):
    """Whether Keras fails to reduce scalar step logs under ``strategy``.

    Multi-worker mode only; decided by tracing (not running) Keras'
    reduction of a scalar once per strategy, in the cross-replica context
    where `make_train_function` runs. Every worker traces the same probe.
    """
    if not in_multi_worker_mode(strategy):
        return False
    key = id(strategy)
    if key not in _REDUCTION_FAILS:

        @tf.function
        def probe():
            values = strategy.run(lambda: tf.constant(0.0))
            trainer = _keras_internals.tensorflow_trainer()
            return trainer.reduce_per_replica(values, strategy, reduction="auto")

        try:
            probe.get_concrete_function()
            _REDUCTION_FAILS[key] = False
        except ValueError:
            _REDUCTION_FAILS[key] = True
    return _REDUCTION_FAILS[key]


def step_logs(logs, vector):
    """``logs`` as a train/test step returns them: scalars, or ``[1]``
    tensors if ``vector`` (see `needs_vector_logs`)."""
    if not vector:
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}
