"""The steps of `MarginModel` on PyTorch: eager steps with the penalty,
`backward()`, and the non-finite guard around the update."""

import warnings

import keras
import torch

from marginfit.backend.steps import penalized_loss
from marginfit.backend.torch.gradients import AutogradGradients


def _all_finite(tensors):
    """Whether every element of every tensor (None entries aside) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


class MarginTrainer:
    """The PyTorch steps of `MarginModel`.

    Refusal: ``compile(jit_compile=True)`` (``torch.compile``) cannot trace
    the penalty's or the adversary's backward passes inside the step.
    """

    def compile(self, *args, jit_compile="auto", **kwargs):
        if jit_compile is True and (self.penalty is not None or self.adversary is not None):
            raise ValueError(
                "jit_compile=True (torch.compile) cannot trace the margin's or the "
                "adversary's gradients inside the step on the PyTorch backend. Compile "
                "with jit_compile=False (PyTorch's default), or use KERAS_BACKEND=jax "
                "for a compiled step."
            )
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def train_step(self, data):
        """One training step with the penalty (`keras.Model.train_step`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.adversary is not None:
            x = self._adversarial(x, y).detach()
        term, _, loss = penalized_loss(self, x, y, sample_weight, True, AutogradGradients(True))
        self.zero_grad()
        counted = self.on_nonfinite != "apply"
        if self.trainable_weights:
            loss.backward()
            weights = self.trainable_weights[:]
            gradients = [weight.value.grad for weight in weights]
            if self.update_rule is not None:
                gradients = self._ruled_gradients(weights, gradients, x, y, sample_weight)
            finite = not counted or _all_finite([loss, *gradients])
            if counted:
                self.nonfinite_steps.update_state(not finite)
            if finite or isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                with torch.no_grad():
                    self.optimizer.apply(gradients, weights)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
        return self._logs(
            x,
            y,
            keras.tree.map_structure(lambda t: t.detach(), term.outputs),
            sample_weight,
            training=True,
        )

    def _ruled_gradients(self, weights, gradients, x, y, sample_weight):
        """The update rule's gradients (`marginfit.update_rule`)."""

        def gradient_at(values):
            values = [v.detach().requires_grad_(True) for v in values]
            with keras.StatelessScope(state_mapping=list(zip(weights, values))):
                *_, loss = penalized_loss(self, x, y, sample_weight, True, AutogradGradients(True))
            return list(torch.autograd.grad(loss, values, allow_unused=True))

        current = [weight.value.detach() for weight in weights]
        return self.update_rule.gradients(current, gradients, gradient_at)

    def test_step(self, data):
        """One evaluation step with the penalty (`keras.Model.test_step`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        term = self._penalty_term(x, y, sample_weight, False, AutogradGradients(False))
        self._loss(x, y, term, sample_weight, training=False)
        return self._logs(x, y, term.outputs, sample_weight, training=False)
