"""The label check inside a JAX step, and compiled functions of batches."""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from marginfit import labels as labels_lib


def class_indices(labels, num_classes):
    """`marginfit.backend.class_indices` on JAX: ``[batch]`` int32 class
    indices. Out-of-range labels cannot stop a compiled JAX step;
    `marginfit.checks` refuses them before `fit()`."""
    labels = jnp.asarray(labels)
    if labels_lib.is_one_hot(labels.shape, num_classes):
        return jnp.argmax(labels, axis=-1).astype("int32")
    return jnp.reshape(labels, (-1,)).astype("int32")


def traced(model, function):
    """``function`` of batches, compiled once per input shape as a pure
    function of the model's variables; returns numpy arrays."""
    variables = list(model.trainable_variables) + list(model.non_trainable_variables)

    @jax.jit
    def run(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    return lambda *args: [np.asarray(t) for t in run([v.value for v in variables], *args)]
