"""PyTorch's gradient primitive: autograd on the graph that the penalty's
forward pass records (`marginfit.penalty.GradientPrimitive`), and the input
gradients of the attacks."""

import contextlib

import keras
import torch

from marginfit import penalty
from marginfit.penalty import unconnected_message


def _leaf(x):
    """``x`` as a float tensor that autograd differentiates with respect to."""
    return keras.ops.convert_to_tensor(x, "float32").detach().requires_grad_(True)


class AutogradGradients(penalty.GradientPrimitive):
    """Records a function with gradients enabled, every float input made a
    leaf that requires gradients, so that the graph holds the path to a
    tensor that no trainable weight precedes (a frozen base, the input).

    Args:
        create_graph: Whether the weights' gradient goes through the
            recorded gradients (a training step): they then build their own
            graph.
    """

    def __init__(self, create_graph):
        self.create_graph = create_graph

    def record(self, function, x):
        hooked, hook = penalty.collecting_hook()
        x = keras.tree.map_structure(
            lambda t: _leaf(t) if torch.is_tensor(t) and t.is_floating_point() else t, x
        )
        with torch.enable_grad():
            differentiable, aux = function(x, hook)
        return aux, AutogradRecording(differentiable, hooked, self.create_graph)


class AutogradRecording(penalty.Recording):
    """The `Recording` of an `AutogradGradients` pass."""

    def __init__(self, differentiable, hooked, create_graph):
        self.differentiable = differentiable
        self.hooked = hooked
        self.create_graph = create_graph

    def gradients(self, of, seed, wrt):
        output = self.differentiable[of]
        with torch.enable_grad():
            gradients = torch.autograd.grad(
                output,
                [self.hooked[name] for name in wrt],
                grad_outputs=seed.to(output.dtype),
                retain_graph=True,
                create_graph=self.create_graph,
                allow_unused=True,
            )
        for name, gradient in zip(wrt, gradients):
            if gradient is None:
                raise ValueError(unconnected_message(name))
        return list(gradients)

    @contextlib.contextmanager
    def unrecorded(self):
        create_graph, self.create_graph = self.create_graph, False
        try:
            yield
        finally:
            self.create_graph = create_graph


def input_gradient(function, x):
    """``[batch, ...]`` gradient of ``sum(function(x))`` with respect to
    the float tensor ``x``."""
    with torch.enable_grad():
        x = _leaf(x)
        (gradient,) = torch.autograd.grad(torch.sum(function(x)), x)
    return gradient


def outputs_and_jacobian(function, x):
    """``(outputs, jacobian)``: ``function(x)``, ``[batch, classes]``, and
    each example's ``[batch, classes, ...]`` Jacobian with respect to its
    own row of ``x`` (examples are independent): one backward pass per
    class."""
    with torch.enable_grad():
        x = _leaf(x)
        outputs = function(x)
        rows = [
            torch.autograd.grad(torch.sum(outputs[:, k]), x, retain_graph=True)[0]
            for k in range(outputs.shape[-1])
        ]
    return outputs.detach(), torch.stack(rows, dim=1)
