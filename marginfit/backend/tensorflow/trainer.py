"""The steps of `MarginModel` on TensorFlow, shaped like Keras' own
`TensorFlowTrainer.train_step`: one tape, `compute_loss` plus the penalty's
term, the optimizer's scaled update (skipped where not finite), the logs."""

import warnings

import keras
import tensorflow as tf

from marginfit.backend.steps import penalized_loss
from marginfit.backend.tensorflow import multi_worker, replicas, updates
from marginfit.backend.tensorflow.gradients import TapeGradients


class MarginTrainer:
    """The TensorFlow steps of `MarginModel`.

    Workarounds (see `multi_worker`): under `MultiWorkerMirroredStrategy`
    the symbolic build is retried with the worker's own batch, and the
    step's logs get the shape ``[1]`` where Keras cannot reduce scalars.
    """

    def train_step(self, data):
        """One training step (`keras.Model.train_step`) with the penalty."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = self._adversarial(x, y)
        with tf.GradientTape() as tape:
            term, _, loss = penalized_loss(self, x, y, sample_weight, True, TapeGradients(tape))
        if self.trainable_weights:
            gradients = tape.gradient(loss, self.trainable_weights)
            if self.update_rule is not None:
                gradients = self._ruled_gradients(gradients, x, y, sample_weight)
            self._apply_gradients(loss, gradients)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
        logs = self._logs(x, y, term.outputs, sample_weight, training=True)
        return multi_worker.step_logs(logs, self._vector_logs)

    def _ruled_gradients(self, gradients, x, y, sample_weight):
        """The update rule's gradients (`marginfit.update_rule`), over the
        global batch, returned per replica as Keras sums them."""
        weights = self.trainable_variables

        def gradient_at(values):
            values = [tf.convert_to_tensor(v) for v in values]
            with tf.GradientTape() as tape:
                tape.watch(values)
                with keras.StatelessScope(state_mapping=list(zip(weights, values))):
                    *_, loss = penalized_loss(self, x, y, sample_weight, True, TapeGradients(tape))
            return replicas.summed(_dense(tape.gradient(loss, values)))

        ruled = self.update_rule.gradients(
            [w.value for w in weights], replicas.summed(_dense(gradients)), gradient_at
        )
        count = replicas.replicas_in_sync()
        return [g if g is None or count == 1 else g / count for g in ruled]

    def _apply_gradients(self, loss, gradients):
        """Applies the step's gradients unless ``on_nonfinite`` and a
        non-finite loss or gradient (on any replica) forbid it; counts such
        steps in ``nonfinite_steps``."""
        if self.on_nonfinite == "apply":
            self._apply(gradients)
            return
        finite = updates.all_finite([loss, *gradients])
        self.nonfinite_steps.update_state(tf.logical_not(finite))
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self._apply(gradients)
        else:
            updates.apply_if(finite, self._apply, (gradients,))

    def _apply(self, gradients):
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))

    def test_step(self, data):
        """One evaluation step (`keras.Model.test_step`) with the penalty."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        term = self._penalty_term(x, y, sample_weight, False, TapeGradients())
        self._loss(x, y, term, sample_weight, training=False)
        logs = self._logs(x, y, term.outputs, sample_weight, training=False)
        return multi_worker.step_logs(logs, self._vector_logs)

    def make_train_function(self, force=False):
        self._vector_logs = multi_worker.needs_vector_logs(self.distribute_strategy)
        return super().make_train_function(force)

    def make_test_function(self, force=False):
        self._vector_logs = multi_worker.needs_vector_logs(self.distribute_strategy)
        return super().make_test_function(force)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        try:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        except ValueError as error:
            multi_worker.symbolic_build(self, iterator, error)


def _dense(gradients):
    """The gradients with `tf.IndexedSlices` made dense."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in gradients]
