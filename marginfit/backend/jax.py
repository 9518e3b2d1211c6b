"""The JAX backend of `MarginModel`: the gradient primitive (`jax.vjp` with
respect to a zero perturbation added at each margin layer), the global
batch, and the stateless training and evaluation steps around them.

Keras' JAX trainer differentiates `compute_loss_and_updates` with
`jax.value_and_grad`; the margin's own backward passes (`jax.vjp`) run
inside it, so the exact margin's second-order gradient is JAX's own.
Under `keras.distribution` the step is one program over the global batch
(XLA's SPMD partitioning), so the loss is the global batch's with no
collective of ours.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from marginfit import distances as distances_lib
from marginfit import margin as margin_lib
from marginfit import resume
from marginfit.backend.common import GlobalBatch, global_batch, replicas_in_sync  # noqa: F401


def class_indices(labels, num_classes):
    """Class index per example from sparse or one-hot labels.

    Args:
        labels: ``[batch]`` or ``[batch, 1]`` class indices, or
            ``[batch, num_classes]`` one-hot (or soft) labels.
        num_classes: Number of classes ``C`` of the model output.

    Returns:
        ``[batch]`` int32 class indices. Out-of-range labels cannot stop a
        compiled JAX step; `marginfit.checks` refuses them before `fit()`.
    """
    labels = jnp.asarray(labels)
    if margin_lib.is_one_hot(labels.shape, num_classes):
        return jnp.argmax(labels, axis=-1).astype("int32")
    return jnp.reshape(labels, (-1,)).astype("int32")


def uniform_keys(batch_size, classes, seed, offset):
    """``[batch, classes]`` uniform keys in [0, 1) from ``(first, step)``,
    one row per example of the global batch (``offset`` is 0)."""
    first, step = seed
    key = jax.random.fold_in(jax.random.key(first), jnp.asarray(step, "uint32"))
    return jax.random.uniform(key, (batch_size, classes), "float32")


def uniform_like(x, seed, minval, maxval):
    """Uniform float32 noise in ``[minval, maxval)`` of the shape of ``x``,
    from the stateless seed ``(first, step)``."""
    first, step = seed
    key = jax.random.fold_in(jax.random.key(first), jnp.asarray(step, "uint32"))
    return jax.random.uniform(key, jnp.shape(x), "float32", minval, maxval)


def input_gradient(function, x):
    """``[batch, ...]`` gradient of ``sum(function(x))`` with respect to
    the float array ``x``."""
    return jax.grad(lambda points: jnp.sum(function(points)))(x)


def outputs_and_jacobian(function, x):
    """``(outputs, jacobian)``: ``function(x)``, ``[batch, classes]``, and
    each example's ``[batch, classes, ...]`` Jacobian with respect to its
    own row of ``x`` (examples are independent): one backward pass per
    class, vectorised."""
    outputs, pullback = jax.vjp(function, x)
    classes = outputs.shape[-1]
    one_hots = jnp.broadcast_to(
        jnp.eye(classes, dtype=outputs.dtype)[:, None, :], (classes, *outputs.shape)
    )
    (rows,) = jax.vmap(pullback)(one_hots)  # [classes, batch, ...]
    return outputs, jnp.moveaxis(rows, 0, 1)


def as_input(x):
    """The model input as one array (what a margin on it differentiates)."""
    return keras.ops.convert_to_tensor(x)


class PerturbationGradients(distances_lib.Gradients):
    """`Gradients` from the `jax.vjp` of the score differences with respect
    to a zero perturbation at each margin layer.

    Args:
        pullback: The vjp function of ``{name: differences}``.
        differences: ``{name: [batch, k]}`` score differences.
        names: The margin layers' names, in order.
    """

    def __init__(self, pullback, differences, names):
        self.pullback = pullback
        self.differences = differences
        self.names = names

    def __call__(self, name, selector, targets=None):
        cotangents = {
            key: selector.astype(value.dtype) if key == name else jnp.zeros_like(value)
            for key, value in self.differences.items()
        }
        (gradients,) = self.pullback(cotangents)
        indices = range(len(self.names)) if targets is None else targets
        return [gradients[self.names[i]] for i in indices]


def _state_variables(model):
    """The variables a forward pass reads or writes (the optimizer's for
    its step count)."""
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)  # absent before compile()
    if optimizer is not None:
        variables += list(optimizer.variables)
    return variables


def record(model, forward, x, outer_tape, persistent):
    """Runs ``forward(x, hook)`` (a `model.Forward`) as a function of a zero
    perturbation at each margin layer and returns ``(forward_result,
    gradients)``.

    Variable updates of the pass (moving statistics, seed states) are
    assigned afterwards, in the enclosing `keras.StatelessScope`.
    """
    del outer_tape, persistent  # TensorFlow's
    names = list(model.margin.layers)
    variables = _state_variables(model)
    values = [variable.value for variable in variables]

    def run(perturbations):
        def hook(name, activation):
            if perturbations is None:
                shapes[name] = jax.ShapeDtypeStruct(activation.shape, activation.dtype)
                return activation
            return activation + perturbations[name].astype(activation.dtype)

        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            result = forward(x, hook)
        updated = [scope.get_current_value(variable) for variable in variables]
        kind.append(type(result))
        # The auxiliary outputs must be arrays, for JAX to carry them out.
        return result.differences, (result.outputs, result.targets, result.batch.sums, updated)

    shapes, kind = {}, []
    jax.eval_shape(lambda: run(None)[0])
    zeros = {name: jnp.zeros(shapes[name].shape, shapes[name].dtype) for name in names}
    differences, pullback, (outputs, targets, sums, updated) = jax.vjp(run, zeros, has_aux=True)
    for variable, before, after in zip(variables, values, updated):
        if after is not None and after is not before:
            variable.assign(after)
    result = kind[-1](outputs, targets, differences, GlobalBatch(sums))
    return result, PerturbationGradients(pullback, differences, names)


def traced(model, function):
    """``function`` of batches, compiled once per input shape as a pure
    function of the model's variables; returns numpy arrays."""
    variables = list(model.trainable_variables) + list(model.non_trainable_variables)

    @jax.jit
    def run(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    return lambda *args: [np.asarray(t) for t in run([v.value for v in variables], *args)]


def _all_finite(tensors):
    """Scalar bool: every element of every array is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(tensors)]))


class MarginTrainer:
    """The steps of `MarginModel` on JAX: Keras' stateless steps, with the
    margin inside `compute_loss_and_updates` and the non-finite guard
    around the update."""

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, after which no weight shares its buffer with
        another variable.

        With ``use_ema``, Keras 3.15's JAX trainer ends `fit()` by assigning
        the optimizer's averages to the weights as the same arrays; the next
        compiled step donates the weights' buffers, which deletes the
        averages too (`evaluate()` then `save()` fails with "Array has been
        deleted"). Each weight gets its own copy here.
        """
        history = super().fit(*args, **kwargs)
        for variable in self.trainable_variables:
            variable.assign(jnp.copy(variable.value))
        return history

    def compute_loss_and_updates(
        self,
        trainable_variables,
        non_trainable_variables,
        metrics_variables,
        x,
        y,
        sample_weight,
        training=False,
        optimizer_variables=None,
    ):
        """The loss with the margin, as a pure function of the state (for
        `jax.value_and_grad`); updates the loss logs.

        Returns:
            ``(loss, (unscaled_loss, y_pred, non_trainable_variables,
            metrics_variables))``, as Keras' JAX trainer does.
        """
        mapping = self._state_mapping(
            trainable_variables, non_trainable_variables, metrics_variables, optimizer_variables
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            y_pred, penalty = self._forward(x, y, sample_weight, training=training)
            loss = unscaled_loss = self._loss(x, y, y_pred, sample_weight, penalty, training)
            if training and self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)
        non_trainable_variables = [scope.get_current_value(v) for v in self.non_trainable_variables]
        metrics_variables = [scope.get_current_value(v) for v in self.metrics_variables]
        return loss, (unscaled_loss, y_pred, non_trainable_variables, metrics_variables)

    def _state_mapping(self, trainable, non_trainable, metrics, optimizer_variables=None):
        """``[(variable, value)]`` of the model's (and the optimizer's)
        variables for a `keras.StatelessScope`."""
        mapping = list(zip(self.trainable_variables, trainable))
        mapping += zip(self.non_trainable_variables, non_trainable)
        mapping += zip(self.metrics_variables, metrics)
        if optimizer_variables is not None:
            mapping += zip(self.optimizer.variables, optimizer_variables)
        return mapping

    def make_train_function(self, force=False):
        """`keras.Model.make_train_function`, passing over the batches a
        resumed epoch already trained on (`marginfit.BackupAndRestore`)."""
        super().make_train_function(force)
        if not isinstance(self.train_function, resume.SkippingTrainFunction):
            self.train_function = resume.SkippingTrainFunction(self, self.train_function)
        return self.train_function

    def train_step(self, state, data):
        """One training step: the loss with the margin and its gradient, the
        update (kept only where finite, as ``on_nonfinite`` says), and the
        logs."""
        trainable, non_trainable, optimizer_variables, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.adversary is not None:
            x = self._perturbed(state, x, y)
        gradient_function = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
        (loss, aux), gradients = gradient_function(
            trainable,
            non_trainable,
            metrics,
            x,
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer_variables,
        )
        _, y_pred, non_trainable, metrics = aux
        new_trainable, new_optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable
        )
        counted = self.on_nonfinite != "apply"
        event = None
        if counted:
            finite = _all_finite([loss, gradients])
            event = jnp.logical_not(finite)
            if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
                new_trainable = jax.tree.map(keep, new_trainable, trainable)
                new_optimizer_variables = jax.tree.map(
                    keep, new_optimizer_variables, optimizer_variables
                )
        logs, metrics = self._stateless_logs(
            metrics, x, y, y_pred, sample_weight, True, counted, event
        )
        return logs, (new_trainable, non_trainable, new_optimizer_variables, metrics)

    def _perturbed(self, state, x, y):
        """The training adversary's perturbation of ``x``, as a function of
        the step's state (the weights it attacks, the step count seeding
        its random start); no gradient flows through it."""
        trainable, non_trainable, optimizer_variables, _ = state
        mapping = self._state_mapping(trainable, non_trainable, (), optimizer_variables)
        with keras.StatelessScope(state_mapping=mapping):
            return self.adversary.perturb(self, x, y, seed=self._attack_seed())

    def test_step(self, state, data):
        """One evaluation step: the loss with the margin, the compiled
        metrics and the distances to the boundary, in inference mode."""
        trainable, non_trainable, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _, (_, y_pred, non_trainable, metrics) = self.compute_loss_and_updates(
            trainable, non_trainable, metrics, x, y, sample_weight, training=False
        )
        logs, metrics = self._stateless_logs(metrics, x, y, y_pred, sample_weight, False, False)
        return logs, (trainable, non_trainable, metrics)

    def _stateless_logs(self, metrics, x, y, y_pred, sample_weight, training, count, event=None):
        """`_logs` as a pure function of the metrics' variables; counts a
        non-finite ``event`` first."""
        mapping = list(zip(self.metrics_variables, metrics))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            if event is not None:
                self.nonfinite_steps.update_state(event)
            logs = self._logs(x, y, y_pred, sample_weight, training, count)
        return logs, [scope.get_current_value(v) for v in self.metrics_variables]
