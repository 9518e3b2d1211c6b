"""The backend-specific part of marginfit, one package per Keras backend,
laid out as Keras lays out ``keras/src/backend/<name>/``.

Each package gives the same names: `MarginTrainer` (the steps),
`gradient_primitive` (the `marginfit.penalty.GradientPrimitive` of a pass
outside a training step; each trainer creates its own), the label check
inside the step (`class_indices`), the global batch of replicated training
(`global_batch`, `replicas_in_sync`), `traced` (a compiled function of
batches) and the attacks' input gradients (`input_gradient`,
`outputs_and_jacobian`). What every trainer shares is in `steps`.

Each package also holds its backend's workarounds: TensorFlow retries the
symbolic build under `MultiWorkerMirroredStrategy` and shapes the step logs
``[1]`` where Keras cannot reduce scalars there; JAX copies the weights
after a `fit()` with ``use_ema`` (Keras 3.15 aliases them with the
averages); PyTorch refuses ``jit_compile=True``, which cannot trace the
penalty's backward passes.
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
class_indices = _module.class_indices
"""``class_indices(labels, num_classes)``: the ``[batch]`` int class index
of each example, from ``[batch]`` or ``[batch, 1]`` class indices or
``[batch, num_classes]`` one-hot (or soft) labels, checked inside the step
where the backend can (`labels.large_label_message`)."""
global_batch = _module.global_batch
gradient_primitive = _module.gradient_primitive
input_gradient = _module.input_gradient
outputs_and_jacobian = _module.outputs_and_jacobian
replicas_in_sync = _module.replicas_in_sync
traced = _module.traced

__all__ = [
    "BACKENDS",
    "MarginTrainer",
    "class_indices",
    "global_batch",
    "gradient_primitive",
    "input_gradient",
    "outputs_and_jacobian",
    "replicas_in_sync",
    "traced",
]
