"""Update rules: how a training step turns its gradient into the gradient
the optimizer applies, for tricks that change the update rather than the
loss. `SAM` (sharpness-aware minimization, and its adaptive form) is one.

A step with an update rule computes its loss (`compute_loss` plus the
penalty's term) and gradient as usual, then calls
``rule.gradients(weights, gradients, gradient_at)`` once:

- ``weights``: the ``[...]`` values of `model.trainable_variables`, in order;
- ``gradients``: the loss's gradients there (None where a weight has none),
  summed over the replicas of a distributed step, so every replica sees the
  gradient of the global batch;
- ``gradient_at(values)``: the same loss's gradients at other weight values
  (the same batch, labels, sample weights and penalty), summed the same way.
  That pass changes no state: its metrics, batch-norm statistics and other
  variable updates are dropped.

The rule returns the gradients to apply, in the same global terms; the step
checks them (``on_nonfinite``) and hands them to the optimizer, layer
groups and loss scaling included. Under mixed precision every gradient is
scaled by the loss scale, which a rule that only uses their direction (as
SAM does) need not undo.

Gradient accumulation needs no rule: Keras' optimizers accumulate with
``gradient_accumulation_steps=N`` (each sub-optimizer of a
`keras.optimizers.MultiOptimizer` too), which `MarginModel` honours.
"""

import keras
from keras import ops


class UpdateRule:
    """The base of an update rule (see the module docstring)."""

    def gradients(self, weights, gradients, gradient_at):
        """The gradients to apply; by default the step's own."""
        del weights, gradient_at
        return gradients

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="marginfit")
class SAM(UpdateRule):
    """Sharpness-aware minimization (Foret et al. 2021, arXiv 2010.01412):
    the gradient applied is the loss's gradient at ``w + e``, the worst
    nearby weights to first order, ``e = rho * g / ||g||_2`` (``g`` the
    gradient at ``w``, the norm over all trainable weights).

    With ``adaptive=True`` it is adaptive SAM (Kwon et al. 2021, arXiv
    2102.11600), whose neighbourhood scales with each weight:
    ``e = rho * T^2 g / ||T g||_2``, ``T = |w| + eta`` elementwise.

    Each step takes two gradient passes; replicas perturb with the gradient
    of the global batch (the paper's m-sharpness with m the global batch).

    Args:
        rho: Radius of the neighbourhood, in weight units (SAM; the authors'
            default 0.05) or relative to each weight (adaptive; 0.5 there).
        adaptive: Whether to scale the neighbourhood by the weights.
        eta: The adaptive form's floor of ``T``, in weight units (0.01, as
            Kwon et al.).
    """

    def __init__(self, rho=0.05, adaptive=False, eta=0.01):
        if not rho > 0 or not eta >= 0:
            raise ValueError(
                f"SAM needs rho > 0 and eta >= 0; received rho={rho!r}, eta={eta!r}. "
                "Use rho=0.05 (SAM) or rho=0.5 with adaptive=True (adaptive SAM)."
            )
        self.rho, self.adaptive, self.eta = float(rho), bool(adaptive), float(eta)

    def gradients(self, weights, gradients, gradient_at):
        scales = [ops.abs(w) + self.eta if self.adaptive else 1.0 for w in weights]
        scaled = [None if g is None else g * t for g, t in zip(gradients, scales)]
        norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in scaled if g is not None))
        step = self.rho / (norm + 1e-12)
        shifted = [
            w if g is None else w + ops.cast(step, w.dtype) * g * t
            for w, g, t in zip(weights, scaled, scales)
        ]
        return gradient_at(shifted)

    def get_config(self):
        return {"rho": self.rho, "adaptive": self.adaptive, "eta": self.eta}


def check_update_rule(rule):
    """``rule`` (an `UpdateRule`, its config dict, or None), checked."""
    if isinstance(rule, dict):
        rule = keras.saving.deserialize_keras_object(rule)
    if rule is not None and not isinstance(rule, UpdateRule):
        raise TypeError(
            f"`update_rule` must be a `marginfit.UpdateRule` (e.g. `marginfit.SAM()`) "
            f"or None; received {rule!r}."
        )
    return rule
