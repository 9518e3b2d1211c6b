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


def distance_metric_name(layer_name):
    """Log name of the mean distance to the boundary at a margin layer."""
    return f"distance_{layer_name}"


class MarginMetrics(MetricsList):
    """The margin's metrics as one group: ``ce_loss``, ``margin_loss`` and
    one ``distance_<layer>`` per margin layer, all streaming means."""

    def __init__(self, layer_names, name="margin_metrics"):
        super().__init__(
            [
                DirectionalMean("ce_loss", "down"),
                DirectionalMean("margin_loss", "down"),
                *(
                    DirectionalMean(distance_metric_name(layer_name), "up")
                    for layer_name in layer_names
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
    def distances(self):
        """One metric per margin layer, in the order of the margin's layers."""
        return self.metrics[2:]
