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
    if name in _LOWER_IS_BETTER:
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
    competitor's boundary is below ``gamma`` at any margin layer. The metric
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


class MarginMetrics(_keras_internals.MetricsList):
    """The margin's metrics as one group: ``ce_loss``, ``margin_loss``,
    ``violation_rate``, ``dead_rate`` and one ``distance_<layer>`` per
    margin layer.

    Grouped so that Keras' monitoring callbacks find their directions.
    """

    def __init__(self, layer_names, gamma, name="margin_metrics"):
        self.layer_names = tuple(layer_names)
        means = [
            "ce_loss",
            "margin_loss",
            "dead_rate",
            *map(distance_metric_name, self.layer_names),
        ]
        metrics = [keras.metrics.Mean(name=mean) for mean in means] + [ViolationRate(gamma)]
        for metric in metrics:
            _keras_internals.declare_direction(metric, direction(metric.name))
        super().__init__(metrics, name=name)
        self.by_name = {metric.name: metric for metric in metrics}

    def update(self, ce_loss, margin_loss, nearest, dead, batch_size, sample_weight=None):
        """Adds one batch to every metric of the group.

        Args:
            ce_loss: Scalar, the loss without the margin, unscaled.
            margin_loss: Scalar, the batch's margin loss.
            nearest: One ``[batch]`` tensor per margin layer: each example's
                distance to the nearest competitor's boundary.
            dead: ``[batch]`` bool, the examples no gradient can move.
            batch_size: Number of examples, the weight of the scalar means.
            sample_weight: Optional ``[batch]`` weights of the examples.
        """
        self.by_name["ce_loss"].update_state(ce_loss, sample_weight=batch_size)
        self.by_name["margin_loss"].update_state(margin_loss, sample_weight=batch_size)
        self.by_name["dead_rate"].update_state(keras.ops.cast(dead, self.dtype))
        for layer_name, layer_nearest in zip(self.layer_names, nearest):
            self.by_name[distance_metric_name(layer_name)].update_state(layer_nearest)
        self.by_name["violation_rate"].update_state(
            keras.ops.stack(nearest, axis=-1), sample_weight
        )

    def result(self):
        """``{name: value}`` of every metric in the group."""
        return self.get_result()
