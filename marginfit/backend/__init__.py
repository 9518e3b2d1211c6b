"""The backend-specific part of `MarginModel`, one module per Keras
backend (as Keras lays out ``keras/src/backend/<name>/``).

Each gives the same names: the gradient primitive (`record`, which runs the
margin's forward pass and returns its `distances.Gradients`), the label
check inside the step (`class_indices`), the global batch of replicated
training (`global_batch`, `replicas_in_sync`, `uniform_keys`), `as_input`,
`traced` (a compiled function of batches) and `MarginTrainer`, the mixin
with the training and evaluation steps.
"""

import keras

BACKENDS = ("tensorflow", "jax")
"""The Keras backends marginfit runs on."""

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from marginfit.backend.tensorflow import (
        MarginTrainer,
        as_input,
        class_indices,
        global_batch,
        record,
        replicas_in_sync,
        traced,
        uniform_keys,
    )
elif _BACKEND == "jax":
    from marginfit.backend.jax import (
        MarginTrainer,
        as_input,
        class_indices,
        global_batch,
        record,
        replicas_in_sync,
        traced,
        uniform_keys,
    )
else:
    raise ImportError(
        f"marginfit runs on Keras' TensorFlow and JAX backends, but KERAS_BACKEND "
        f"is {_BACKEND!r}. Set KERAS_BACKEND=tensorflow (the default) or "
        "KERAS_BACKEND=jax before importing marginfit."
    )

__all__ = [
    "BACKENDS",
    "MarginTrainer",
    "as_input",
    "class_indices",
    "global_batch",
    "record",
    "replicas_in_sync",
    "traced",
    "uniform_keys",
]
