"""The TensorFlow backend of `MarginModel`: the gradient primitive (from
the `tf.GradientTape` that recorded the forward pass), the label checks
inside the step, the global batch of `tf.distribute` replicas, and the
training and evaluation steps around them.

The math around the primitive, in `keras.ops`, is in `marginfit.margin` and
`marginfit.distances`.
"""

import contextlib
import warnings

import keras
import tensorflow as tf

from marginfit import _multi_worker, replicas, resume, updates
from marginfit import distances as distances_lib
from marginfit import margin as margin_lib


def class_indices(labels, num_classes):
    """Class index per example from sparse or one-hot labels.

    Args:
        labels: ``[batch]`` or ``[batch, 1]`` class indices, or
            ``[batch, num_classes]`` one-hot (or soft) labels.
        num_classes: Number of classes ``C`` of the model output.

    Returns:
        ``[batch]`` int32 class indices.
    """
    labels = tf.convert_to_tensor(labels)
    if margin_lib.is_one_hot(labels.shape, num_classes):
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    indices = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    # XLA drops assertions; outside XLA a bad label stops the step here.
    tf.debugging.assert_non_negative(indices, message=margin_lib.negative_label_message())
    tf.debugging.assert_less(
        indices, num_classes, message=margin_lib.large_label_message(num_classes)
    )
    return indices


def replicas_in_sync():
    """The number of replicas whose gradients Keras sums in a step."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def global_batch(batch_size, sums=None, positions=False):
    """The `replicas.GlobalBatch` of this replica."""
    return replicas.GlobalBatch(batch_size, sums, positions)


def stateless_seed(seed):
    """``[2]`` int64 seed from ``(first, step)`` (ints or int tensors)."""
    first, step = seed
    return tf.stack([tf.cast(first, tf.int64), tf.cast(step, tf.int64)])


def uniform_keys(batch_size, classes, seed, offset):
    """``[batch, classes]`` uniform keys of the examples at global
    positions ``offset ..`` (`replicas.uniform_rows`), from ``(first,
    step)``."""
    return replicas.uniform_rows(batch_size, classes, stateless_seed(seed), offset)


def uniform_like(x, seed, minval, maxval):
    """Uniform float32 noise in ``[minval, maxval)`` of the shape of ``x``,
    from the stateless seed ``(first, step)``."""
    return tf.random.stateless_uniform(tf.shape(x), stateless_seed(seed), minval, maxval)


def input_gradient(function, x):
    """``[batch, ...]`` gradient of ``sum(function(x))`` with respect to
    the float tensor ``x``."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = function(x)
    return tape.gradient(value, x)


def outputs_and_jacobian(function, x):
    """``(outputs, jacobian)``: ``function(x)``, ``[batch, classes]``, and
    each example's ``[batch, classes, ...]`` Jacobian with respect to its
    own row of ``x`` (examples are independent)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = function(x)
    return outputs, tape.batch_jacobian(outputs, x)


def as_input(x):
    """The model input as one tensor (what a margin on it differentiates)."""
    return x if isinstance(x, tf.Tensor) else tf.convert_to_tensor(x)


class TapeGradients(distances_lib.Gradients):
    """`Gradients` from a persistent tape that recorded the forward pass.

    Args:
        tape: The tape.
        differences: ``{name: [batch, k]}`` score differences it recorded.
        targets: The margin layers' ``[batch, ...]`` activations.
        names: The margin layers' names.
        outer_tape: The tape computing the weights' gradients, if any; it
            records the backward passes it must differentiate through.
    """

    def __init__(self, tape, differences, targets, names, outer_tape=None):
        self.tape = tape
        self.differences = differences
        self.targets = targets
        self.names = names
        self.outer_tape = outer_tape

    def __call__(self, name, selector, targets=None):
        # Seeding the backward pass with `selector` picks competitors without
        # slicing (a slice taken outside the tape would not be recorded).
        indices = range(len(self.targets)) if targets is None else targets
        gradients = self.tape.gradient(
            self.differences[name],
            [self.targets[i] for i in indices],
            output_gradients=selector,
        )
        for index, gradient in zip(indices, gradients):
            if gradient is None:
                raise ValueError(distances_lib.unconnected_message(self.names[index]))
        return gradients

    def unrecorded(self):
        if self.outer_tape is None:
            return contextlib.nullcontext()
        return self.outer_tape.stop_recording()


def record(model, forward, x, outer_tape, persistent):
    """Runs ``forward(x, hook=None)`` (a `margin.Forward`) under a tape.

    Returns ``(forward_result, gradients)``: what ``forward`` returned and
    the `TapeGradients` of its differences w.r.t. its targets.
    """
    with tf.GradientTape(persistent=persistent) as tape:
        # Every float input, so that the tape records the path to a margin
        # layer that no trainable weight precedes (a frozen base, a
        # concatenation of inputs).
        tape.watch([t for t in tf.nest.flatten(x) if tf.is_tensor(t) and t.dtype.is_floating])
        result = forward(x, None)
    gradients = TapeGradients(
        tape, result.differences, result.targets, model.margin.layers, outer_tape
    )
    return result, gradients


def traced(model, function):
    """``function`` of batches, traced once per input signature; returns
    numpy arrays."""
    traced_function = tf.function(function, reduce_retracing=True)
    return lambda *args: [t.numpy() for t in traced_function(*args)]


class MarginTrainer:
    """The steps of `MarginModel` on TensorFlow: `train_step` under a
    `tf.GradientTape`, `test_step`, and the functions around them
    (multi-worker logs, resuming mid-epoch)."""

    def train_step(self, data):
        """One training step (`keras.Model.train_step`): the forward pass
        with the margin, the loss, the update (skipped where not finite, as
        ``on_nonfinite`` says), and the logs."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.adversary is not None:
            x = self.adversary.perturb(self, x, y, seed=self._attack_seed())
        with tf.GradientTape() as tape:
            y_pred, penalty = self._forward(x, y, sample_weight, training=True, tape=tape)
            loss = self._loss(x, y, y_pred, sample_weight, penalty, training=True)
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)
        if self.trainable_weights:
            gradients = tape.gradient(loss, self.trainable_weights)
            self._apply_gradients(loss, gradients)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
        counted = self.on_nonfinite != "apply"
        logs = self._logs(x, y, y_pred, sample_weight, training=True, count=counted)
        return _multi_worker.step_logs(logs, self._vector_logs)

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
        """One evaluation step (`keras.Model.test_step`): the loss with the
        margin, the compiled metrics and the distances to the boundary, in
        inference mode."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, penalty = self._forward(x, y, sample_weight, training=False)
        self._loss(x, y, y_pred, sample_weight, penalty, training=False)
        # Evaluation updates nothing; its logs leave the count out.
        logs = self._logs(x, y, y_pred, sample_weight, training=False, count=False)
        return _multi_worker.step_logs(logs, self._vector_logs)

    def make_train_function(self, force=False):
        """`keras.Model.make_train_function`, passing over the batches a
        resumed epoch already trained on (`marginfit.BackupAndRestore`)."""
        self._vector_logs = _multi_worker.needs_vector_logs(self.distribute_strategy)
        super().make_train_function(force)
        if not isinstance(self.train_function, resume.SkippingTrainFunction):
            self.train_function = resume.SkippingTrainFunction(self, self.train_function)
        return self.train_function

    def make_test_function(self, force=False):
        """`keras.Model.make_test_function`, with the logs' shape that
        multi-worker evaluation needs."""
        self._vector_logs = _multi_worker.needs_vector_logs(self.distribute_strategy)
        return super().make_test_function(force)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        try:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        except ValueError as error:
            _multi_worker.symbolic_build(self, iterator, error)
