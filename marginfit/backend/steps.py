"""What every backend's training and evaluation step shares."""


def penalized_loss(model, x, y, sample_weight, training, gradients):
    """The step's loss with the penalty's term, as each backend's trainer
    differentiates it.

    Args:
        model: The `MarginModel`.
        gradients: The backend's `marginfit.penalty.GradientPrimitive`.

    Returns:
        ``(term, loss, scaled)``: the penalty's `Term`, the scalar loss
        (`compute_loss` plus the term) and, when training with an
        optimizer, the loss scaled for mixed precision (else ``loss``).
    """
    term = model._penalty_term(x, y, sample_weight, training, gradients)
    loss = model._loss(x, y, term, sample_weight, training=training)
    scaled = loss
    if training and model.optimizer is not None:
        scaled = model.optimizer.scale_loss(loss)
    return term, loss, scaled
