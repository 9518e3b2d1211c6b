"""Input-gradient regularization: double backpropagation (Drucker & LeCun
1992; Ross & Doshi-Velez 2018, arXiv 1711.09404), a second
`marginfit.Penalty` that needs a derivative inside the step. The guide
"Write your own penalty" builds it step by step."""

import keras
from keras import ops

from marginfit.activations import INPUT
from marginfit.penalty import Penalty, PenaltyResult


# --8<-- [start:class]
@keras.saving.register_keras_serializable(package="marginfit")
class InputGradientPenalty(Penalty):
    """The squared norm of the cross-entropy's gradient with respect to the
    input, which flattens the loss around each example.

    Per example: ``||d CE(f(x), y) / dx||_2^2``, in squared loss units per
    squared input unit; the penalty is its batch mean (weighted by
    ``sample_weight`` as Keras weights a loss), and the weights' gradient
    goes through the input gradient (second order).

    ```python
    model = marginfit.MarginModel(
        inputs, logits, penalty=marginfit.InputGradientPenalty(weight=10.0)
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ```

    Args:
        weight: Multiplier of the penalty in the total loss, >= 0.
    """

    name = "input_gradient"  # logged as input_gradient_loss
    layers = (INPUT,)  # what the step makes reachable: the model input
    # --8<-- [end:class]

    # --8<-- [start:call]
    def forward(self, step, outputs):
        classes = outputs.shape[-1]
        labels = ops.one_hot(step.class_indices(classes), classes)
        logits = step.model.output_kind == "logits"
        losses = keras.losses.categorical_crossentropy(
            labels, ops.cast(outputs, keras.backend.floatx()), from_logits=logits
        )
        return {"loss": losses}, losses
        # --8<-- [end:call]

    # --8<-- [start:value]
    def finish(self, step, outputs, losses, recording):
        (gradient,) = recording.gradients("loss", ops.ones_like(losses), [INPUT])
        floatx = keras.backend.floatx()
        flat = ops.reshape(ops.cast(gradient, floatx), (ops.shape(gradient)[0], -1))
        per_example = ops.sum(ops.square(flat), axis=-1)
        if step.sample_weight is not None:
            per_example *= ops.reshape(ops.cast(step.sample_weight, floatx), (-1,))
        value = ops.mean(per_example)
        return PenaltyResult(outputs, self.weight * value, value)
        # --8<-- [end:value]
