"""`MarginHyperModel`: the search space of a large-margin classifier."""

import keras_tuner as kt

import marginfit
from marginfit import LargeMargin, networks
from marginfit.experiments import Experiment

# Where the margin goes; "hidden" layers are the conv and dense hidden layers.
MARGIN_PLACEMENTS = (
    "input",
    "last_hidden",
    "all_hidden",
    "input+last_hidden",
    "input+all_hidden",
)


class MarginHyperModel(kt.HyperModel):
    """Builds a compiled `marginfit.MarginModel`: an `Experiment`'s
    `networks.classifier` with the margin, one optimizer per layer group.

    The search space is declared in `build`, as keras-tuner does: ``gamma``
    (log), ``norm``, ``margin_layers`` (one of `MARGIN_PLACEMENTS`),
    ``conv_layers`` and ``conv_filters`` (images only), ``dense_layers``,
    ``dense_units``, ``lower_learning_rate`` and ``upper_learning_rate``
    (log; conv layers, or the first dense layer, vs the rest) and
    ``ce_weight``; every other setting is the ``experiment``'s. Fix or
    narrow any of them with the tuner's ``hyperparameters``:

    ```python
    hp = keras_tuner.HyperParameters()
    hp.Fixed("norm", "inf")
    hp.Float("gamma", 1.0, 100.0, sampling="log")
    tuner = keras_tuner.RandomSearch(
        MarginHyperModel(input_shape=(8, 8, 1), num_classes=10),
        hyperparameters=hp, objective="val_accuracy", max_trials=10)
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=5)
    ```

    Args:
        input_shape: Shape of one example: ``(height, width, channels)``
            gives conv layers then dense layers; ``(features,)`` dense only.
        num_classes: Number of classes (of integer labels).
        experiment: The `marginfit.experiments.Experiment` whose other
            settings every trial has; by default its defaults without the
            weight average (a trial is short).
        penalties: Other `marginfit.Penalty` objects that every trial adds
            to the searched margin (a `marginfit.Penalties`), e.g.
            ``[marginfit.InputGradientPenalty(weight=1.0)]``.
        name: Name of the hypermodel.
    """

    def __init__(
        self, input_shape, num_classes, experiment=None, penalties=(), name="margin_hypermodel"
    ):
        super().__init__(name=name)
        # Checked now, beside the margin each trial searches.
        self.penalties = marginfit.Penalties([LargeMargin(["input"]), *penalties]).penalties[1:]
        # Validates the shape, classes and margin options now, not in a trial.
        self.input_shape = networks.check_shape(input_shape, num_classes)
        self.num_classes = num_classes
        self.experiment = Experiment(ema=0.0) if experiment is None else experiment
        self.experiment.margin(networks.classifier(self.input_shape, num_classes))

    def build(self, hp):
        conv_filters = ()
        if len(self.input_shape) == 3:
            conv_layers = hp.Int("conv_layers", 1, 2)
            conv_filters = (hp.Choice("conv_filters", [8, 16, 32]),) * conv_layers
        dense_units = (hp.Choice("dense_units", [32, 64, 128]),) * hp.Int("dense_layers", 1, 2)
        experiment = self.experiment.replace(
            conv_filters=conv_filters,
            dense_units=dense_units,
            layers="+".join(
                networks.check_placement(hp.Choice("margin_layers", list(MARGIN_PLACEMENTS)))
            ),
            norm=hp.Choice("norm", ["2", "inf"]),
            gamma=hp.Float("gamma", 1e-2, 1e4, sampling="log"),
            lr_features=hp.Float("lower_learning_rate", 1e-4, 1e-2, sampling="log"),
            lr_head=hp.Float("upper_learning_rate", 1e-4, 1e-2, sampling="log"),
            ce_weight=hp.Float("ce_weight", 0.1, 1.0),
        )
        fresh = [type(p).from_config(p.get_config()) for p in self.penalties]
        model, _ = experiment.build(self.input_shape, self.num_classes, penalties=fresh)
        return model
