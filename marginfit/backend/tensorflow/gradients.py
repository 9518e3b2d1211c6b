"""TensorFlow's gradient primitive: a `tf.GradientTape` that records the
penalty's forward pass (`marginfit.penalty.GradientPrimitive`), and the
input gradients of the attacks."""

import contextlib

import tensorflow as tf

from marginfit import penalty
from marginfit.penalty import unconnected_message


class TapeGradients(penalty.GradientPrimitive):
    """Records a function under a persistent tape that watches the float
    inputs, so that it also records the path to a tensor that no trainable
    weight precedes (the input, a frozen base, a concatenation of inputs).

    Args:
        tape: The step's tape of the weights' gradients, None out of
            training; it records the backward passes that the weights'
            gradient goes through (see `Recording.unrecorded`).
    """

    def __init__(self, tape=None):
        self.tape = tape

    def record(self, function, x):
        hooked, hook = penalty.collecting_hook()
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([t for t in tf.nest.flatten(x) if tf.is_tensor(t) and t.dtype.is_floating])
            differentiable, aux = function(x, hook)
        return aux, TapeRecording(tape, differentiable, hooked, self.tape)

    def unrecorded(self):
        return _stop_recording(self.tape)


def _stop_recording(tape):
    """``tape.stop_recording()``, or nothing to stop without a tape."""
    return contextlib.nullcontext() if tape is None else tape.stop_recording()


class TapeRecording(penalty.Recording):
    """The `Recording` of a `TapeGradients` pass."""

    def __init__(self, tape, differentiable, hooked, outer_tape):
        self.tape = tape
        self.differentiable = differentiable
        self.hooked = hooked
        self.outer_tape = outer_tape

    def gradients(self, of, seed, wrt):
        # Seeding the backward pass picks competitors without slicing (a
        # slice taken outside the tape would not be recorded).
        gradients = self.tape.gradient(
            self.differentiable[of], [self.hooked[name] for name in wrt], output_gradients=seed
        )
        for name, gradient in zip(wrt, gradients):
            if gradient is None:
                raise ValueError(unconnected_message(name))
        return gradients

    def unrecorded(self):
        return _stop_recording(self.outer_tape)


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
