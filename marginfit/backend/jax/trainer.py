"""The steps of `MarginModel` on JAX: Keras' stateless steps, with the
penalty inside `compute_loss_and_updates` (which Keras' trainer
differentiates with `jax.value_and_grad`) and the non-finite guard around
the update."""

import jax
import jax.numpy as jnp
import keras

from marginfit.backend.jax.gradients import PerturbationGradients
from marginfit.backend.steps import penalized_loss


def _all_finite(tensors):
    """Scalar bool: every element of every array is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(tensors)]))


class MarginTrainer:
    """The JAX steps of `MarginModel`.

    Workaround: with ``use_ema``, Keras 3.15's JAX trainer ends `fit()` by
    assigning the optimizer's averages to the weights as the same arrays;
    the next compiled step donates the weights' buffers, which deletes the
    averages too (`evaluate()` then `save()` fails with "Array has been
    deleted"). `fit` gives each weight its own copy.
    """

    def fit(self, *args, **kwargs):
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
        """The loss with the penalty, as a pure function of the state (for
        `jax.value_and_grad`); updates the loss logs.

        Returns:
            ``(loss, (unscaled_loss, y_pred, non_trainable_variables,
            metrics_variables))``, as Keras' JAX trainer does.
        """
        mapping = self._state_mapping(
            trainable_variables, non_trainable_variables, metrics_variables, optimizer_variables
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            gradients = PerturbationGradients(self)
            term, unscaled_loss, loss = penalized_loss(
                self, x, y, sample_weight, training, gradients
            )
        non_trainable_variables = [scope.get_current_value(v) for v in self.non_trainable_variables]
        metrics_variables = [scope.get_current_value(v) for v in self.metrics_variables]
        return loss, (unscaled_loss, term.outputs, non_trainable_variables, metrics_variables)

    def _state_mapping(self, trainable, non_trainable, metrics, optimizer_variables=None):
        """``[(variable, value)]`` of the model's (and the optimizer's)
        variables for a `keras.StatelessScope`."""
        mapping = list(zip(self.trainable_variables, trainable))
        mapping += zip(self.non_trainable_variables, non_trainable)
        mapping += zip(self.metrics_variables, metrics)
        if optimizer_variables is not None:
            mapping += zip(self.optimizer.variables, optimizer_variables)
        return mapping

    def train_step(self, state, data):
        """One training step: the loss with the penalty and its gradient,
        the update (kept only where finite, as ``on_nonfinite`` says), and
        the logs."""
        trainable, non_trainable, optimizer_variables, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.adversary is not None:
            # On the step's state (the weights it attacks, the step count
            # seeding its random start); no gradient flows through it.
            mapping = self._state_mapping(trainable, non_trainable, (), optimizer_variables)
            with keras.StatelessScope(state_mapping=mapping):
                x = self._adversarial(x, y)
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
        if self.update_rule is not None:
            # The second passes see the first's state and change none.
            def gradient_at(values):
                state = (non_trainable, metrics, x, y, sample_weight)
                return gradient_function(
                    values, *state, training=True, optimizer_variables=optimizer_variables
                )[1]

            gradients = self.update_rule.gradients(trainable, gradients, gradient_at)
        new_trainable, new_optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable
        )
        event = None
        if self.on_nonfinite != "apply":
            finite = _all_finite([loss, gradients])
            event = jnp.logical_not(finite)
            if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
                new_trainable = jax.tree.map(keep, new_trainable, trainable)
                new_optimizer_variables = jax.tree.map(
                    keep, new_optimizer_variables, optimizer_variables
                )
        logs, metrics = self._stateless_logs(metrics, x, y, y_pred, sample_weight, True, event)
        return logs, (new_trainable, non_trainable, new_optimizer_variables, metrics)

    def test_step(self, state, data):
        """One evaluation step: the loss with the penalty and the compiled
        and penalty metrics, in inference mode."""
        trainable, non_trainable, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _, (_, y_pred, non_trainable, metrics) = self.compute_loss_and_updates(
            trainable, non_trainable, metrics, x, y, sample_weight, training=False
        )
        logs, metrics = self._stateless_logs(metrics, x, y, y_pred, sample_weight, False)
        return logs, (trainable, non_trainable, metrics)

    def _stateless_logs(self, metrics, x, y, y_pred, sample_weight, training, event=None):
        """`_logs` as a pure function of the metrics' variables; counts a
        non-finite ``event`` first."""
        mapping = list(zip(self.metrics_variables, metrics))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            if event is not None:
                self.nonfinite_steps.update_state(event)
            logs = self._logs(x, y, y_pred, sample_weight, training)
        return logs, [scope.get_current_value(v) for v in self.metrics_variables]
