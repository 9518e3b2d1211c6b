"""The PyTorch backend of `MarginModel`: the gradient primitive (from the
autograd graph that the forward pass records), the label checks, and the
eager training and evaluation steps around them.

The forward pass runs with gradients enabled (also in evaluation, which
Keras runs under `torch.no_grad()`); `torch.autograd.grad` of the score
differences with respect to the margin layers' activations builds its own
graph in training (``create_graph``), so the weights' gradient of the
exact margin is second order, as on the other backends.
"""

import contextlib
import warnings

import keras
import torch

from marginfit import distances as distances_lib
from marginfit import margin as margin_lib
from marginfit import resume
from marginfit.backend.common import global_batch, replicas_in_sync  # noqa: F401


def class_indices(labels, num_classes):
    """Class index per example from sparse or one-hot labels.

    Args:
        labels: ``[batch]`` or ``[batch, 1]`` class indices, or
            ``[batch, num_classes]`` one-hot (or soft) labels.
        num_classes: Number of classes ``C`` of the model output.

    Returns:
        ``[batch]`` int64 class indices. A label out of range stops the
        (eager) step with the message of the other backends' checks.
    """
    labels = keras.ops.convert_to_tensor(labels)
    if margin_lib.is_one_hot(labels.shape, num_classes):
        return torch.argmax(labels, dim=-1)
    indices = torch.reshape(labels, (-1,)).long()
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(margin_lib.negative_label_message())
    if indices.numel() and int(indices.max()) >= num_classes:
        raise ValueError(margin_lib.large_label_message(num_classes))
    return indices


def _generator(seed):
    """A `torch.Generator` on the CPU seeded from ``(first, step)``."""
    first, step = (int(part) for part in seed)
    return torch.Generator().manual_seed(first * 2**32 + step)


def uniform_keys(batch_size, classes, seed, offset):
    """``[batch, classes]`` uniform keys in [0, 1) from ``(first, step)``,
    one row per example of the batch (``offset`` is 0)."""
    del offset
    # Drawn on the CPU (the generator's), moved to Keras' device.
    return keras.ops.convert_to_tensor(
        torch.rand((int(batch_size), classes), generator=_generator(seed))
    )


def uniform_like(x, seed, minval, maxval):
    """Uniform float32 noise in ``[minval, maxval)`` of the shape of ``x``,
    from the stateless seed ``(first, step)``."""
    noise = torch.rand(tuple(x.shape), generator=_generator(seed))
    return (minval + (maxval - minval) * noise).to(x.device)


def _leaf(x):
    """``x`` as a float tensor that autograd differentiates with respect to."""
    return keras.ops.convert_to_tensor(x, "float32").detach().requires_grad_(True)


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


def as_input(x):
    """The model input as one tensor (what a margin on it differentiates)."""
    return keras.ops.convert_to_tensor(x)


class AutogradGradients(distances_lib.Gradients):
    """`Gradients` from the autograd graph of the forward pass.

    Args:
        differences: ``{name: [batch, k]}`` score differences.
        targets: The margin layers' ``[batch, ...]`` activations.
        names: The margin layers' names.
        differentiated: Whether the weights' gradient will go through these
            gradients (a training step): their own graph is then built.
    """

    def __init__(self, differences, targets, names, differentiated):
        self.differences = differences
        self.targets = targets
        self.names = names
        self.differentiated = differentiated

    def __call__(self, name, selector, targets=None):
        indices = range(len(self.targets)) if targets is None else targets
        with torch.enable_grad():
            gradients = torch.autograd.grad(
                self.differences[name],
                [self.targets[i] for i in indices],
                grad_outputs=selector.to(self.differences[name].dtype),
                retain_graph=True,
                create_graph=self.differentiated,
                allow_unused=True,
            )
        for index, gradient in zip(indices, gradients):
            if gradient is None:
                raise ValueError(distances_lib.unconnected_message(self.names[index]))
        return list(gradients)

    @contextlib.contextmanager
    def unrecorded(self):
        differentiated, self.differentiated = self.differentiated, False
        try:
            yield
        finally:
            self.differentiated = differentiated


def record(model, forward, x, outer_tape, persistent):
    """Runs ``forward(x, hook=None)`` (a `model.Forward`) with gradients
    enabled and returns ``(forward_result, gradients)``.

    Every float input is made a leaf that autograd differentiates with
    respect to, so that the graph holds the path to a margin layer that no
    trainable weight precedes (a frozen base, the input itself).
    """
    del outer_tape, persistent  # TensorFlow's
    differentiated = torch.is_grad_enabled()
    x = keras.tree.map_structure(
        lambda t: _leaf(t) if torch.is_tensor(t) and t.is_floating_point() else t, x
    )
    with torch.enable_grad():
        result = forward(x, None)
    gradients = AutogradGradients(
        result.differences, result.targets, model.margin.layers, differentiated
    )
    return result, gradients


def traced(model, function):
    """``function`` of batches, run eagerly on tensors; returns numpy
    arrays."""
    del model

    def run(*args):
        tensors = [keras.ops.convert_to_tensor(arg) for arg in args]
        return [keras.ops.convert_to_numpy(t) for t in function(*tensors)]

    return run


def _all_finite(tensors):
    """Whether every element of every tensor (None entries aside) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


class MarginTrainer:
    """The steps of `MarginModel` on PyTorch: eager `train_step` and
    `test_step` with the margin, and the non-finite guard around the
    update."""

    def compile(self, *args, jit_compile="auto", **kwargs):
        """`keras.Model.compile`; refuses ``jit_compile=True`` (``torch.compile``)
        with a margin or an adversary, whose backward passes inside the step
        it cannot trace."""
        if jit_compile is True and (self.margin is not None or self.adversary is not None):
            raise ValueError(
                "jit_compile=True (torch.compile) cannot trace the margin's or the "
                "adversary's gradients inside the step on the PyTorch backend. Compile "
                "with jit_compile=False (PyTorch's default), or use KERAS_BACKEND=jax "
                "for a compiled step."
            )
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def train_step(self, data):
        """One training step: the forward pass with the margin, the loss,
        `backward()`, the update (skipped where not finite, as
        ``on_nonfinite`` says), and the logs."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.adversary is not None:
            x = self.adversary.perturb(self, x, y, seed=self._attack_seed()).detach()
        y_pred, penalty = self._forward(x, y, sample_weight, training=True)
        loss = self._loss(x, y, y_pred, sample_weight, penalty, training=True)
        if self.optimizer is not None:
            loss = self.optimizer.scale_loss(loss)
        self.zero_grad()
        counted = self.on_nonfinite != "apply"
        if self.trainable_weights:
            loss.backward()
            weights = self.trainable_weights[:]
            gradients = [weight.value.grad for weight in weights]
            finite = not counted or _all_finite([loss, *gradients])
            if counted:
                self.nonfinite_steps.update_state(not finite)
            if finite or isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                with torch.no_grad():
                    self.optimizer.apply(gradients, weights)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
        return self._logs(x, y, y_pred.detach(), sample_weight, training=True, count=counted)

    def test_step(self, data):
        """One evaluation step: the loss with the margin, the compiled
        metrics and the distances to the boundary, in inference mode."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, penalty = self._forward(x, y, sample_weight, training=False)
        self._loss(x, y, y_pred, sample_weight, penalty, training=False)
        return self._logs(x, y, y_pred, sample_weight, training=False, count=False)

    def make_train_function(self, force=False):
        """`keras.Model.make_train_function`, passing over the batches a
        resumed epoch already trained on (`marginfit.BackupAndRestore`)."""
        super().make_train_function(force)
        if not isinstance(self.train_function, resume.SkippingTrainFunction):
            self.train_function = resume.SkippingTrainFunction(self, self.train_function)
        return self.train_function
