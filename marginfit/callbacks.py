"""Callbacks that understand per-group optimizers."""

import keras


def sub_optimizers(optimizer):
    """The optimizers whose learning rates apply: the groups of a
    `MultiOptimizer`, else ``[optimizer]``."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


class GroupLearningRateScheduler(keras.callbacks.Callback):
    """Schedules every optimizer group by one factor, keeping their ratios.

    At the start of each epoch, each optimizer (each group of a
    `MultiOptimizer`, or the single optimizer) gets the learning rate
    ``base_rate * schedule(epoch)``, where ``base_rate`` is its rate when
    training first began with this callback. Keras' `LearningRateScheduler`
    keeps the ratios only for ``schedule(epoch, lr)``; an absolute
    ``schedule(epoch)`` there gives every group the same rate.

    ```python
    factor = lambda epoch: 0.5 ** (epoch // 10)
    model.fit(x, y, epochs=30, callbacks=[GroupLearningRateScheduler(factor)])
    ```

    Args:
        schedule: ``schedule(epoch) -> float``, the factor for the 0-based
            epoch.
        base_rates: Optional ``{optimizer name: rate}`` to use as base rates
            instead of the rates found when training begins (e.g. when
            resuming a run whose rates were already scaled).
        verbose: 1 prints the rates set at each epoch.

    The rates set are logged as ``learning_rate_<name>`` (one per group) or
    ``learning_rate``, like Keras' own scheduler.
    """

    def __init__(self, schedule, base_rates=None, verbose=0):
        super().__init__()
        self.schedule = schedule
        self.base_rates = dict(base_rates or {})
        self.verbose = verbose

    def on_train_begin(self, logs=None):
        for optimizer in sub_optimizers(self.model.optimizer):
            self.base_rates.setdefault(
                optimizer.name, float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            )

    def on_epoch_begin(self, epoch, logs=None):
        factor = self.schedule(epoch)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            raise ValueError(
                f"`schedule({epoch})` must return a float factor; received "
                f"{factor!r}."
            )
        for optimizer in sub_optimizers(self.model.optimizer):
            rate = self.base_rates[optimizer.name] * float(factor)
            optimizer.learning_rate = rate
            if self.verbose:
                print(
                    f"\nEpoch {epoch + 1}: GroupLearningRateScheduler setting "
                    f"{optimizer.name} learning rate to {rate}."
                )

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for optimizer in sub_optimizers(self.model.optimizer):
            grouped = optimizer is not self.model.optimizer
            key = f"learning_rate_{optimizer.name}" if grouped else "learning_rate"
            logs[key] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
