"""Streaming metrics that `MarginModel` reports in the Keras logs, and which
direction of each is better."""

import keras

from marginfit import _keras_internals

DISTANCE_PREFIX = "distance_"
_LOWER_IS_BETTER = frozenset({"loss", "ce_loss", "margin_loss", "violation_rate", "dead_rate"})


def direction(log_name):
    """Whether higher (``"up"``) or lower (``"down"``) values of a log that
    `MarginModel` adds are better, with or without ``val_``; None for other
    names.

    The one source of the direction of our metrics: Keras' monitoring
    callbacks (``mode="auto"``) and `marginfit.tuning.objective` read it.
    """
    name = log_name.removeprefix("val_")
    if name in _LOWER_IS_BETTER or name.endswith("_loss"):
        return "down"
    if name.startswith(DISTANCE_PREFIX):
        return "up"
    return None


def distance_metric_name(layer_name):
    """Log name of the mean distance to the boundary at a margin layer."""
    return f"{DISTANCE_PREFIX}{layer_name}"


@keras.saving.register_keras_serializable(package="marginfit")
class ViolationRate(keras.metrics.Metric):
    """Streaming fraction of examples whose margin is violated.

    An example violates the margin when its distance to the nearest
    boundary is below ``gamma`` at any margin layer (`MarginModel` passes the
    distances of `distances.boundary_distances` and each layer's ``gamma /
    layer_weight``, so that both are in the layer's units). The metric
    accumulates the (sample-weighted) counts of violating and of all
    examples across batches; the result is their ratio, in [0, 1]. Lower is
    better.

    Args:
        gamma: The desired margin, one float per margin layer (or one for
            all), in each layer's distance units.
        name: Name of the metric in the logs.
        dtype: Dtype of the metric's state.
    """

    def __init__(self, gamma, name="violation_rate", dtype=None):
        super().__init__(name=name, dtype=dtype)
        _keras_internals.declare_direction(self, direction("violation_rate"))
        gammas = gamma if isinstance(gamma, (list, tuple)) else [gamma]
        self.gamma = tuple(float(g) for g in gammas)
        self.violations = self.add_variable((), "zeros", name="violations")
        self.examples = self.add_variable((), "zeros", name="examples")

    def update_state(self, distances, sample_weight=None):
        """Adds one batch.

        Args:
            distances: ``[batch, layers]`` distances to the boundary, one
                column per margin layer (the nearest competitor's).
            sample_weight: Optional ``[batch]`` weights of the examples.
        """
        distances = keras.ops.convert_to_tensor(distances, self.dtype)
        gamma = keras.ops.convert_to_tensor(self.gamma, self.dtype)
        violated = keras.ops.cast(
            keras.ops.any(keras.ops.less(distances, gamma), axis=-1), self.dtype
        )
        if sample_weight is None:
            weights = keras.ops.ones_like(violated)
        else:
            weights = keras.ops.reshape(
                keras.ops.cast(sample_weight, self.dtype), keras.ops.shape(violated)
            )
        self.violations.assign_add(keras.ops.sum(violated * weights))
        self.examples.assign_add(keras.ops.sum(weights))

    def result(self):
        return keras.ops.divide_no_nan(self.violations, self.examples)

    def get_config(self):
        return {**super().get_config(), "gamma": list(self.gamma)}


@keras.saving.register_keras_serializable(package="marginfit")
class StepCount(keras.metrics.Metric):
    """Streaming count of the training steps at which an event happened
    (e.g. a skipped update). Lower is better.

    Under a distribution strategy every replica counts the step, and the
    count is read from the first replica: an event the replicas agree on
    (one shared update) counts once, in the epoch logs and in each batch's
    logs alike (which average the replicas' values).

    Args:
        name: Name of the metric in the logs.
        dtype: Dtype of the metric's state.
    """

    def __init__(self, name="steps", dtype=None):
        super().__init__(name=name, dtype=dtype)
        _keras_internals.declare_direction(self, "down")
        self.count = self.add_variable((), "zeros", aggregation="only_first_replica", name="count")

    def update_state(self, event):
        """Adds 1 if the scalar bool ``event`` holds."""
        self.count.assign_add(keras.ops.cast(event, self.dtype))

    def result(self):
        return keras.ops.cast(self.count, self.dtype)


class PenaltyMetrics(_keras_internals.MetricsList):
    """The logs of a model's penalty, as one group: ``ce_loss`` (what
    `compute_loss` gives: the compiled and regularization losses),
    ``<name>_loss`` (the penalty's unweighted value) and the penalty's own
    metrics (`marginfit.Penalty.make_metrics`), some in evaluation only.

    Grouped so that Keras' monitoring callbacks find their directions.

    Args:
        penalty: The `marginfit.Penalty`.
    """

    def __init__(self, penalty, name="penalty_metrics"):
        own, self.evaluation_names = penalty.make_metrics()
        self.own_names = tuple(metric.name for metric in own)
        self.loss_name = penalty.loss_name  # None for `Penalties`: its own metrics log each
        losses = ("ce_loss",) if self.loss_name is None else ("ce_loss", self.loss_name)
        means = [keras.metrics.Mean(name=mean) for mean in losses]
        metrics = [*means, *own]
        for metric in metrics:
            found = direction(metric.name)
            if found is not None:
                _keras_internals.declare_direction(metric, found)
        super().__init__(metrics, name=name)
        self.by_name = {metric.name: metric for metric in metrics}

    def update(self, keras_loss, result, batch_size):
        """Adds one step.

        Args:
            keras_loss: Scalar, `compute_loss`'s value, unscaled.
            result: The step's `marginfit.penalty.PenaltyResult`.
            batch_size: Number of examples, the weight of the scalar means.
        """
        self.by_name["ce_loss"].update_state(keras_loss, sample_weight=batch_size)
        if self.loss_name is not None:
            self.by_name[self.loss_name].update_state(result.value, sample_weight=batch_size)
        for name, arguments in result.metrics.items():
            self.by_name[name].update_state(*arguments)

    def result(self):
        """``{name: value}`` of every metric in the group."""
        return self.get_result()
