"""Streaming metrics that `MarginModel` reports in the Keras logs."""

import keras

# Keras' monitoring callbacks (EarlyStopping, ReduceLROnPlateau,
# ModelCheckpoint) in mode="auto" read a metric's direction only from metrics
# grouped in a `MetricsList`; grouping ours in one lets users monitor them
# without passing `mode=`.
from keras.src.trainers.compile_utils import MetricsList

_DIRECTIONS = ("up", "down")


@keras.saving.register_keras_serializable(package="marginfit")
class DirectionalMean(keras.metrics.Mean):
    """A streaming (weighted) mean that declares whether higher is better.

    Args:
        name: Name of the metric in the logs.
        direction: ``"down"`` if lower values are better (losses), ``"up"``
            if higher values are better (distances to the boundary).
        dtype: Dtype of the metric's state.
    """

    def __init__(self, name="mean", direction="down", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"`direction` must be 'up' (higher is better) or 'down' "
                f"(lower is better); received {direction!r}."
            )
        self._direction = direction

    @property
    def direction(self):
        return self._direction

    def get_config(self):
        return {**super().get_config(), "direction": self._direction}


@keras.saving.register_keras_serializable(package="marginfit")
class ViolationRate(keras.metrics.Metric):
    """Streaming fraction of examples whose margin is violated.

    An example violates the margin when its distance to the nearest
    competitor's boundary is below ``gamma`` at any margin layer. The metric
    accumulates the (sample-weighted) counts of violating and of all
    examples across batches; the result is their ratio, in [0, 1].

    Args:
        gamma: The desired margin, one float per margin layer (or one for
            all), in each layer's distance units.
        name: Name of the metric in the logs.
        dtype: Dtype of the metric's state.
    """

    def __init__(self, gamma, name="violation_rate", dtype=None):
        super().__init__(name=name, dtype=dtype)
        gammas = gamma if isinstance(gamma, (list, tuple)) else [gamma]
        self.gamma = tuple(float(g) for g in gammas)
        self.violations = self.add_variable((), "zeros", name="violations")
        self.examples = self.add_variable((), "zeros", name="examples")

    @property
    def direction(self):
        return "down"

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


def distance_metric_name(layer_name):
    """Log name of the mean distance to the boundary at a margin layer."""
    return f"distance_{layer_name}"


def metric_direction(log_name):
    """``"up"``/``"down"`` for a log name that `MarginModel` adds (with or
    without ``val_``), or None for other names."""
    name = log_name[len("val_"):] if log_name.startswith("val_") else log_name
    if name in ("loss", "ce_loss", "margin_loss", "violation_rate"):
        return "down"
    if name.startswith(distance_metric_name("")):
        return "up"
    return None


class MarginMetrics(MetricsList):
    """The margin's metrics as one group: ``ce_loss``, ``margin_loss``,
    ``violation_rate`` and one ``distance_<layer>`` per margin layer."""

    def __init__(self, layer_names, gamma, name="margin_metrics"):
        super().__init__(
            [
                *(
                    DirectionalMean(name, metric_direction(name))
                    for name in ("ce_loss", "margin_loss")
                ),
                ViolationRate(gamma),
                *(
                    DirectionalMean(name, metric_direction(name))
                    for name in map(distance_metric_name, layer_names)
                ),
            ],
            name=name,
        )

    def result(self):
        """``{name: value}`` of every metric in the group."""
        return self.get_result()

    @property
    def ce_loss(self):
        return self.metrics[0]

    @property
    def margin_loss(self):
        return self.metrics[1]

    @property
    def violation_rate(self):
        return self.metrics[2]

    @property
    def distances(self):
        """One metric per margin layer, in the order of the margin's layers."""
        return self.metrics[3:]
