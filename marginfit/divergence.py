"""The KL divergence between a model's predicted distributions, shared by
the penalties that compare two predictions (`marginfit.TRADES`,
`marginfit.VAT`, `marginfit.Distillation`)."""

import keras
from keras import ops

from marginfit import attacks


def log_probabilities(model, outputs):
    """``[batch, classes]`` log-probabilities (in floatx) of ``model``'s
    outputs, logits or probabilities as its ``output_kind`` says."""
    logits = ops.cast(attacks._as_logits(model, outputs), keras.backend.floatx())
    return ops.log_softmax(logits, axis=-1)


def kl(log_p, log_q):
    """``[batch]`` KL(p || q) from log-probabilities (0 where p underflows)."""
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def weighted_mean(per_example, sample_weight):
    """The batch mean of ``[batch]`` values, each times its sample weight
    where given (as Keras weights a loss)."""
    if sample_weight is not None:
        weights = ops.cast(sample_weight, per_example.dtype)
        per_example = per_example * ops.reshape(weights, (-1,))
    return ops.mean(per_example)


def check_perturbable(penalty, model):
    """Raises where ``model`` has not one floating-point input for
    ``penalty`` to perturb."""
    inputs = model.inputs
    if len(inputs) != 1 or not keras.backend.is_float_dtype(inputs[0].dtype):
        raise ValueError(
            f"{type(penalty).__name__} perturbs the model input, so it needs one "
            f"floating-point input; model {model.name!r} takes {[t.dtype for t in inputs]}."
        )
