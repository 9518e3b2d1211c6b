"""The interface of a penalty: a loss term that needs derivatives inside the
training step, as Keras' `Loss` is a term that needs none.

A step calls its model's penalty once, ``penalty(step)``, with a `Step`:
the batch, whether it trains, and the backend's gradient primitive, which
the step creates (a `tf.GradientTape`, a perturbation differentiated by
`jax.vjp`, or PyTorch's autograd). The penalty runs the forward pass itself
under that primitive and returns a `PenaltyResult`; the step adds its
``loss`` to `compute_loss`'s value, as Keras' trainer adds the
regularization losses. `marginfit.LargeMargin` and
`marginfit.InputGradientPenalty` are penalties; the guide "Write your own
penalty" builds the latter step by step.
"""

import contextlib
import dataclasses
import numbers

import keras


@dataclasses.dataclass
class Step:
    """What a training or evaluation step gives its model's penalty.

    Attributes:
        model: The `marginfit.MarginModel`.
        x: The batch's inputs.
        y: The batch's labels for the output the penalty applies to (None
            where the data has none).
        sample_weight: The batch's ``[batch]`` weights (for that output), or None.
        training: Whether the step trains (the forward pass's mode, and
            whether the weights' gradient goes through the penalty).
        gradients: The backend's `GradientPrimitive` for this step.
    """

    model: object
    x: object
    y: object
    sample_weight: object
    training: bool
    gradients: object

    def class_indices(self, classes):
        """``[batch]`` int class indices of the labels (indices or one-hot
        rows), checked inside the step where the backend can."""
        from marginfit import backend  # the backends' primitives subclass this module's

        if self.y is None:
            raise ValueError(
                "MarginModel needs labels: pass `y` to fit()/evaluate(), or a "
                "dataset of (x, y) pairs."
            )
        return backend.class_indices(self.y, classes)

    @property
    def number(self):
        """The training step being taken, counted from 1 (the optimizer's
        iterations + 1, which checkpoints hold), or 0 out of training."""
        optimizer = getattr(self.model, "optimizer", None)
        if not self.training or optimizer is None:
            return 0
        return optimizer.iterations + 1


@dataclasses.dataclass
class PenaltyResult:
    """What a penalty gives the step.

    Attributes:
        outputs: The model outputs of the step's forward pass (what
            `compute_loss` and the compiled metrics see): ``[batch, classes]``,
            or a list or dict with it (`MarginModel.penalty_head` picks it).
        loss: Float32 scalar, the term added to the loss: the penalty's
            weight times ``value``.
        value: Float32 scalar, the unweighted penalty, logged as
            ``<name>_loss``.
        metrics: ``{metric name: arguments of its update_state}`` for the
            penalty's own metrics (see `Penalty.make_metrics`).
    """

    outputs: object
    loss: object
    value: object
    metrics: dict = dataclasses.field(default_factory=dict)


class GradientPrimitive:
    """The backend's gradient primitive (one class per backend, created by
    the step): it runs a function under its recording and differentiates
    what the function returned with respect to tensors the function marked.
    """

    def record(self, function, x):
        """Runs ``function(x, hook)`` and returns ``(aux, recording)``.

        ``function`` calls ``hook(name, tensor)`` on each tensor it will be
        differentiated with respect to and continues with what the hook
        returns; it returns ``(differentiable, aux)``: a dict of float
        tensors whose gradients the `Recording` gives, and anything else
        (a nest of tensors).
        """
        raise NotImplementedError

    def unrecorded(self):
        """A context for work that the weights' gradient does not go through
        (an inner maximisation whose result is cut by ``stop_gradient``): a
        tape stops recording there; JAX and PyTorch need nothing."""
        return contextlib.nullcontext()


def collecting_hook():
    """``(collected, hook)``: a hook that hands each tensor back unchanged
    and collects it by name (for a primitive that differentiates recorded
    tensors, as TensorFlow's and PyTorch's do)."""
    collected = {}

    def hook(name, tensor):
        collected[name] = tensor
        return tensor

    return collected, hook


class Recording:
    """The derivatives of one recorded function (see `GradientPrimitive`)."""

    def gradients(self, of, seed, wrt):
        """Gradients of ``sum(differentiable[of] * seed)``.

        Args:
            of: A key of the recorded function's ``differentiable`` dict.
            seed: Float32 weights of the shape of ``differentiable[of]``
                (one-hot rows pick one column per example).
            wrt: Names given to ``hook``, in the order wanted.

        Returns:
            One gradient per name, of the shape of the hooked tensor;
            differentiable with respect to the weights in a training step,
            except inside `unrecorded`.
        """
        raise NotImplementedError

    def unrecorded(self):
        """A context whose gradients the weights' gradient does not go
        through (cheaper where only their values are needed)."""
        raise NotImplementedError


class Penalty:
    """Base class of a penalty (see the module docstring).

    Subclasses set `name`, give `layers` (the tensors they differentiate
    with respect to: ``"input"`` or layer names), implement `__call__` and
    `get_config`, and may add metrics (`make_metrics`) and checks of the
    model they are given to (`check_model`).

    Args:
        weight: Multiplier of the penalty in the total loss, >= 0.
    """

    name = "penalty"
    """Prefix of the ``<name>_loss`` log."""

    def __init__(self, weight=1.0):
        if not (isinstance(weight, numbers.Real) and not isinstance(weight, bool) and weight >= 0):
            raise ValueError(f"`weight` must be a float >= 0; received {weight!r}.")
        self.weight = float(weight)

    quiet_metrics = ()
    """Names of metrics that the progress bar shows only once they are
    non-zero (`marginfit.logs.shown`)."""

    layers = ()
    """Names of what the penalty differentiates with respect to (``"input"``
    for the model input), which `MarginModel` makes reachable."""

    def __call__(self, step):
        """The penalty of ``step`` (a `Step`), as a `PenaltyResult`: one
        `recorded_pass` with `forward` inside, then `finish`. A penalty that
        needs more (an inner maximisation) overrides this instead."""
        return self.finish(step, *self.recorded_pass(step))

    def recorded_pass(self, step, training=None):
        """``(outputs, aux, recording)``: the model's forward pass in
        ``training`` mode (the step's by default) under the step's gradient
        primitive, with `forward` of its outputs inside."""
        model = step.model
        training = step.training if training is None else training

        def function(x, hook):
            outputs, _ = model.call_with_activations(x, training=training, hook=hook)
            differentiable, aux = self.forward(step, model.penalty_head(outputs))
            return differentiable, (outputs, aux)

        (outputs, aux), recording = step.gradients.record(function, step.x)
        return outputs, aux, recording

    def forward(self, step, outputs):
        """Inside the recorded pass, from the ``[batch, classes]`` output the
        penalty applies to (``model.penalty_head``): ``(differentiable, aux)``,
        a dict of float tensors whose gradients `finish` takes from the
        `Recording`, and anything else."""
        raise NotImplementedError

    def finish(self, step, outputs, aux, recording):
        """After the recorded pass: the `PenaltyResult` (its ``outputs``
        the pass's, all of the model's), from `forward`'s ``aux`` and the ``recording``."""
        raise NotImplementedError

    def shares_pass(self, step):
        """Whether `marginfit.Penalties` may run `forward` and `finish` in a
        forward pass shared with other penalties (True where `__call__` is
        the base class's); otherwise it calls the penalty on its own."""
        return type(self).__call__ is Penalty.__call__

    def make_metrics(self):
        """``(metrics, evaluation_only)``: new `keras.metrics.Metric` objects
        for the entries of `PenaltyResult.metrics`, and the names of those
        logged in evaluation only."""
        return [], ()

    def check_model(self, model):
        """Raises where ``model`` (a `MarginModel` being built) cannot carry
        this penalty; ``model.num_classes`` is known for Functional models."""

    def check_ready(self):
        """Raises where the penalty cannot take a step yet; `fit()` and
        `evaluate()` call it before anything else."""

    @property
    def loss_name(self):
        return f"{self.name}_loss"

    def get_config(self):
        return {"weight": self.weight}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


def unconnected_message(name):
    """The error where the output does not depend on margin layer ``name``
    in the recorded forward pass."""
    return (
        f"The model output does not depend on margin layer {name!r} in the recorded "
        "forward pass. Put the margin on a layer between the inputs and the output "
        "(with integer inputs, after a trainable layer: nothing before it is recorded)."
    )


def check_penalty(penalty):
    """``penalty`` from itself or its config (a list or tuple of them: a
    `marginfit.Penalties`); a `TypeError` for anything else."""
    if isinstance(penalty, (list, tuple)):
        from marginfit.penalties import Penalties

        return Penalties(penalty)
    if isinstance(penalty, dict):
        penalty = keras.saving.deserialize_keras_object(penalty)
    if penalty is not None and not isinstance(penalty, Penalty):
        raise TypeError(
            f"`penalty` must be a `marginfit.Penalty` (e.g. `marginfit.LargeMargin`), a list "
            f"of them, or None; received {penalty!r}."
        )
    return penalty
