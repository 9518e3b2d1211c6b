"""The backend-specific part of `MarginModel`, one module per Keras
backend (as Keras lays out ``keras/src/backend/<name>/``).

Each gives the same names: the gradient primitive (`record`, which runs the
margin's forward pass and returns its `distances.Gradients`), the label
check inside the step (`class_indices`), the global batch of replicated
training (`global_batch`, `replicas_in_sync`, `uniform_keys`), `as_input`,
`traced` (a compiled function of batches), the attacks' input gradients
(`input_gradient`, `outputs_and_jacobian`, `uniform_like`) and
`MarginTrainer`, the mixin with the training and evaluation steps.
"""

import importlib

import keras

BACKENDS = ("tensorflow", "jax", "torch")
"""The Keras backends marginfit runs on."""

_BACKEND = keras.backend.backend()

if _BACKEND not in BACKENDS:
    raise ImportError(
        f"marginfit runs on Keras' TensorFlow, JAX and PyTorch backends, but "
        f"KERAS_BACKEND is {_BACKEND!r}. Set KERAS_BACKEND=tensorflow (the default), "
        "jax or torch before importing marginfit."
    )

_module = importlib.import_module(f"marginfit.backend.{_BACKEND}")
MarginTrainer = _module.MarginTrainer
as_input = _module.as_input
class_indices = _module.class_indices
global_batch = _module.global_batch
input_gradient = _module.input_gradient
outputs_and_jacobian = _module.outputs_and_jacobian
record = _module.record
replicas_in_sync = _module.replicas_in_sync
traced = _module.traced
uniform_keys = _module.uniform_keys
uniform_like = _module.uniform_like

__all__ = [
    "BACKENDS",
    "MarginTrainer",
    "as_input",
    "class_indices",
    "global_batch",
    "input_gradient",
    "outputs_and_jacobian",
    "record",
    "replicas_in_sync",
    "traced",
    "uniform_keys",
    "uniform_like",
]
