"""Losses with complete, reloadable configs."""

import keras


@keras.saving.register_keras_serializable(package="marginfit")
class HuberLoss(keras.losses.Huber):
    """Huber loss that keeps its threshold through saving.

    Per element of the error ``e = y_true - y_pred``: ``e**2 / 2`` where
    ``|e| <= threshold``, else ``threshold * |e| - threshold**2 / 2``; then the
    mean over the last axis. Keras' `Huber` computes the same, but its
    `get_config` omits ``delta``, so a saved model reloads it with the default
    threshold of 1.

    Args:
        threshold: Positive float, where the loss turns from quadratic to
            linear (in the units of the targets).
        reduction, name, dtype: As for `keras.losses.Loss`.
    """

    def __init__(
        self, threshold=1.0, reduction="sum_over_batch_size", name="huber_loss", dtype=None
    ):
        if not threshold > 0:
            raise ValueError(f"`threshold` must be positive; received {threshold!r}.")
        super().__init__(delta=threshold, reduction=reduction, name=name, dtype=dtype)
        self.threshold = float(threshold)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}
