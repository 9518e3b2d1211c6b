"""Callbacks: per-group learning rates, distance histograms for TensorBoard,
warnings and errors about training, and the progress bar."""

import os
import time
import warnings

import keras

from marginfit import logs as logs_lib


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
                f"`schedule({epoch})` must return a float factor; received {factor!r}."
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


class DistanceHistograms(keras.callbacks.Callback):
    """Writes histograms of the distance to the boundary to TensorBoard.

    Every ``every`` epochs (and after the last), each margin layer's
    per-example distances to the nearest decision boundary, in the layer's
    units, on ``validation_data`` (`MarginModel.margin_distances`, inference
    mode) go
    to ``log_dir/validation`` as the histogram ``distance/<layer>`` at the
    epoch's step, where `keras.callbacks.TensorBoard` writes its own
    validation logs; TensorBoard's Histograms tab then shows the margin
    distribution grow.

    ```python
    model.fit(x, y, epochs=30, callbacks=[
        keras.callbacks.TensorBoard("logs"),
        marginfit.DistanceHistograms("logs", (x_val, y_val), every=5),
    ])
    ```

    Args:
        log_dir: TensorBoard log directory.
        validation_data: ``(x, y)`` arrays: ``[n, ...]`` inputs, ``[n]`` labels.
        every: Epochs between histograms.
        batch_size: Examples per batch of the distance computation.
    """

    def __init__(self, log_dir, validation_data, every=1, batch_size=256):
        super().__init__()
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"`every` must be an int >= 1; received {every!r}.")
        x, y = validation_data
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(
                "`validation_data` must be (x, y) with as many labels as "
                f"examples, at least one; received {len(x)} and {len(y)}."
            )
        self.log_dir = os.fspath(log_dir)
        self.validation_data = (x, y)
        self.every = every
        self.batch_size = batch_size
        self._writer = self._summary = None
        self._epoch = None
        self._last_written = None

    def on_train_begin(self, logs=None):
        if getattr(self.model, "margin", None) is None:
            raise ValueError(
                "DistanceHistograms needs a MarginModel with a margin; this "
                f"model ({type(self.model).__name__}) has none."
            )
        # TensorBoard's summaries are TensorFlow's (as for keras.callbacks.TensorBoard).
        import tensorflow as tf

        self._summary = tf.summary
        self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "validation"))

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self._write(epoch)

    def on_train_end(self, logs=None):
        if self._epoch is not None and self._last_written != self._epoch:
            self._write(self._epoch)
        self._writer.close()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _write(self, epoch):
        distances = self.model.margin_distances(*self.validation_data, batch_size=self.batch_size)
        with self._writer.as_default():
            for layer, values in distances.items():
                self._summary.histogram(f"distance/{layer}", values, step=epoch)
        self._writer.flush()
        self._last_written = epoch


class DeadExamplesWarning(keras.callbacks.Callback):
    """Warns once per `fit()` when most examples are dead for the margin.

    `MarginModel.fit` adds it: at the end of the first epoch whose
    ``dead_rate`` log exceeds ``threshold`` it warns that the margin cannot
    move those examples.

    Args:
        threshold: Share of dead examples, in [0, 1], above which to warn.
    """

    def __init__(self, threshold=0.5):
        super().__init__()
        self.threshold = threshold
        self.warned = False

    def on_train_begin(self, logs=None):
        self.warned = False

    def on_epoch_end(self, epoch, logs=None):
        rate = (logs or {}).get("dead_rate")
        if self.warned or rate is None or not rate > self.threshold:
            return
        self.warned = True
        warnings.warn(
            f"In epoch {epoch + 1}, {rate:.0%} of the examples are dead for the "
            "margin: on the wrong side of a boundary whose difference has an "
            "exactly zero gradient at a margin layer (ReLUs that never fire, "
            "saturated outputs). Their distances (difference / epsilon) are not "
            "geometry, and no gradient moves them. Lower the learning rate, check "
            "the initialization, or choose layers the outputs still depend on.",
            RuntimeWarning,
            stacklevel=2,
        )


class CatastrophicOverfittingWarning(RuntimeWarning):
    """Fast adversarial training has overfitted catastrophically (see
    `CatastrophicOverfitting`)."""


class CatastrophicOverfitting(keras.callbacks.Callback):
    """Watches adversarial training for catastrophic overfitting, and by
    default stops it there, as Wong, Rice & Kolter (2020) recommend for
    fast adversarial training (their early stopping compares one batch's
    PGD accuracy with the previous epoch's; this one is stricter, below).

    After each epoch it attacks ``(x, y)`` (a few hundred training examples:
    the authors use one training batch) at ``eps`` with FGSM and with PGD
    (``pgd_steps`` steps from a random start) and logs ``fgsm_accuracy`` and
    ``pgd_accuracy`` of the training weights (not a weight average).
    Catastrophic overfitting is the PGD accuracy falling more than ``drop``
    below its best epoch while the FGSM accuracy stays more than ``drop``
    above it: the model has learnt to defeat the one-step
    attack it trains on, not attacks. Then the callback warns
    (`CatastrophicOverfittingWarning`) and records the 0-based epoch in
    ``collapsed_epoch``; with ``stop``, it ends training and, when training
    ends, restores the weights of the best PGD epoch. ``seconds`` holds the
    time its attacks took.

    ```python
    model.fit(x, y, epochs=20, callbacks=[
        marginfit.callbacks.CatastrophicOverfitting(x[:256], y[:256], eps=0.1)])
    ```

    Args:
        x: ``[n, ...]`` float inputs to attack (training data, never test).
        y: ``[n]`` integer labels.
        eps: L-inf radius of both attacks, in input units.
        drop: The fall in accuracy that counts as a collapse, in (0, 1).
        pgd_steps: Steps of the PGD attack (>= 1).
        stop: Whether to stop training at a collapse and restore the best
            epoch's weights (else only warn and record it).
    """

    def __init__(self, x, y, eps, drop=0.2, pgd_steps=10, stop=True):
        super().__init__()
        if not 0 < drop < 1:
            raise ValueError(f"`drop` must be in (0, 1); received {drop!r}.")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0 (an L-inf radius); received {eps!r}.")
        if not (isinstance(pgd_steps, int) and pgd_steps >= 1):
            raise ValueError(f"`pgd_steps` must be an integer >= 1; received {pgd_steps!r}.")
        if len(x) != len(y) or not len(x):
            raise ValueError(
                f"`x` ({len(x)} examples) and `y` ({len(y)}) must hold the same, "
                "non-zero number of examples to attack."
            )
        self.x, self.y, self.eps = x, y, eps
        self.drop, self.pgd_steps, self.stop = drop, pgd_steps, stop

    def on_train_begin(self, logs=None):
        self.best, self.best_epoch, self.best_weights = -1.0, None, None
        self.collapsed_epoch = None
        self.seconds = 0.0  # spent attacking, for timing the training alone

    def on_epoch_end(self, epoch, logs=None):
        from marginfit import attacks

        model, x, y = self.model, self.x, self.y
        started = time.perf_counter()
        fgsm = attacks.adversarial_accuracy(model, x, y, self.eps, "fgsm")
        pgd = attacks.adversarial_accuracy(model, x, y, self.eps, "pgd", steps=self.pgd_steps)
        self.seconds += time.perf_counter() - started
        if logs is not None:
            logs.update(fgsm_accuracy=fgsm, pgd_accuracy=pgd)
        if pgd > self.best:
            self.best, self.best_epoch, self.best_weights = pgd, epoch, model.get_weights()
        elif self.collapsed_epoch is None and min(self.best, fgsm) - pgd > self.drop:
            self.collapsed_epoch = epoch
            warnings.warn(
                f"Catastrophic overfitting in epoch {epoch + 1}: PGD accuracy at eps "
                f"{self.eps:g} fell to {pgd:.3f} from {self.best:.3f} (epoch "
                f"{self.best_epoch + 1}) while FGSM accuracy is {fgsm:.3f}; the model "
                "defeats the one-step attack, not attacks. "
                + (
                    f"Training stops with the weights of epoch {self.best_epoch + 1}."
                    if self.stop
                    else "Use the weights of an earlier epoch, or a smaller step."
                ),
                CatastrophicOverfittingWarning,
                stacklevel=2,
            )
            if self.stop:
                model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stop and self.collapsed_epoch is not None:
            self.model.set_weights(self.best_weights)


class NonFiniteStepError(keras.callbacks.Callback):
    """Stops `fit()` with a `FloatingPointError` at the first training step
    whose loss or gradient is not finite.

    `MarginModel.fit` adds it under ``on_nonfinite="raise"``. The model
    skipped that step's update, so the weights are those from before the
    batch named in the error.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        count = (logs or {}).get("nonfinite_steps")
        if count is not None and float(count) > 0:
            raise FloatingPointError(
                f"Epoch {self.epoch + 1}, batch {batch + 1}: the loss or a gradient "
                "is NaN or inf, so the step was skipped and the weights are those "
                "from before this batch. Check this batch's data, lower the learning "
                "rate, or clip the gradients (e.g. `clipnorm=1.0`)."
            )


class ProgressBar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, showing what is informative for the model
    (`marginfit.logs.shown`): a count that is always zero with the defaults
    (``nonfinite_steps``, ``dead_rate``) appears once it is not, and stays
    for the rest of the epoch; the penalty's loss appears beside
    ``ce_loss``, not where it is the whole loss. Every log still reaches
    History and the other callbacks.

    `MarginModel.fit` and `evaluate` add one where Keras would add its own
    progress bar (a `keras.callbacks.ProgbarLogger` of yours is kept).
    """

    def __init__(self):
        super().__init__()
        self._seen_names = set()

    def _shown(self, logs):
        if logs is None:
            return None
        kept = logs_lib.shown(self.model, logs, self._seen_names)
        self._seen_names.update(kept)
        return kept

    def on_epoch_begin(self, epoch, logs=None):
        self._seen_names = set()
        super().on_epoch_begin(epoch, logs)

    def on_test_begin(self, logs=None):
        if not self._called_in_fit:
            self._seen_names = set()
        super().on_test_begin(logs)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, self._shown(logs))

    def on_test_batch_end(self, batch, logs=None):
        super().on_test_batch_end(batch, self._shown(logs))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, self._shown(logs))

    def on_test_end(self, logs=None):
        super().on_test_end(self._shown(logs))
