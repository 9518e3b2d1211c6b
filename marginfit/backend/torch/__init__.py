"""The PyTorch backend of marginfit: the gradient primitive (autograd on the
graph the forward pass records), the label checks, and eager steps.

The penalty's forward pass runs with gradients enabled (also in
evaluation, which Keras runs under `torch.no_grad()`); in training,
`torch.autograd.grad` builds its own graph (``create_graph``), so the
weights' gradient of the exact margin is second order, as on the other
backends.
"""

from marginfit.backend.common import global_batch, replicas_in_sync
from marginfit.backend.torch.core import class_indices, traced
from marginfit.backend.torch.gradients import (
    AutogradGradients,
    input_gradient,
    outputs_and_jacobian,
)
from marginfit.backend.torch.trainer import MarginTrainer


def gradient_primitive(model):
    """The gradient primitive of a pass that no weight's gradient goes
    through (evaluation, `MarginModel.margin_distances`)."""
    del model
    return AutogradGradients(create_graph=False)
