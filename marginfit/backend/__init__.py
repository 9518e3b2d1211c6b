"""The one backend-specific part of the margin, one module per Keras
backend (as Keras lays out ``keras/src/backend/<name>/``): the gradients of
the score differences with respect to the margin layers (`layer_distances`,
`boundary_distances`) and the label checks inside the step
(`class_indices`). marginfit has the TensorFlow one.
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND != "tensorflow":
    raise ImportError(
        f"marginfit runs on Keras' TensorFlow backend, but KERAS_BACKEND is "
        f"{_BACKEND!r}. Set KERAS_BACKEND=tensorflow (or leave it unset) before "
        "importing marginfit."
    )

from marginfit.backend.tensorflow import (  # noqa: E402
    boundary_distances,
    class_indices,
    layer_distances,
)

__all__ = ["boundary_distances", "class_indices", "layer_distances"]
