"""The JAX backend of marginfit: the gradient primitive (`jax.vjp` with
respect to a zero perturbation added where the penalty differentiates), the
label checks, and Keras' stateless steps with the penalty inside.

Keras' JAX trainer differentiates `compute_loss_and_updates` with
`jax.value_and_grad`; the penalty's own backward passes (`jax.vjp`) run
inside it, so the exact margin's second-order gradient is JAX's own.
Under `keras.distribution` the step is one program over the global batch
(XLA's SPMD partitioning), so the loss is the global batch's with no
collective of ours.
"""

from marginfit.backend.common import global_batch, replicas_in_sync
from marginfit.backend.jax.core import class_indices, traced
from marginfit.backend.jax.gradients import (
    PerturbationGradients,
    input_gradient,
    outputs_and_jacobian,
)
from marginfit.backend.jax.trainer import MarginTrainer


def gradient_primitive(model):
    """The gradient primitive of a pass outside a training step."""
    return PerturbationGradients(model)
