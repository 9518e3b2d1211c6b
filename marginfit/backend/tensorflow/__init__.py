"""The TensorFlow backend of marginfit: the gradient primitive (a
`tf.GradientTape`), the label checks inside the step, the global batch of
`tf.distribute` replicas, the steps, and the workarounds that TensorFlow's
multi-worker training needs (`multi_worker`)."""

from marginfit.backend.tensorflow.core import class_indices, traced
from marginfit.backend.tensorflow.gradients import (
    TapeGradients,
    input_gradient,
    outputs_and_jacobian,
)
from marginfit.backend.tensorflow.replicas import global_batch, replicas_in_sync
from marginfit.backend.tensorflow.trainer import MarginTrainer


def gradient_primitive(model):
    """The gradient primitive of a pass that no weight's gradient goes
    through (evaluation, `MarginModel.margin_distances`)."""
    del model
    return TapeGradients()
