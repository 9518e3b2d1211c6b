"""`MarginHyperModel`: the search space of a large-margin classifier."""

import math
import numbers

import keras
import keras_tuner as kt

import marginfit

# Where the margin goes; "hidden" layers are the conv and dense hidden layers.
MARGIN_PLACEMENTS = (
    "input",
    "last_hidden",
    "all_hidden",
    "input+last_hidden",
    "input+all_hidden",
)
NORMS = ("1", "2", "inf")


class Space:
    """One hyperparameter's range: a single value (fixed), a ``(low, high)``
    tuple (a range; log-sampled where ``log``) or a list (a choice).

    Args:
        name: The hyperparameter's name.
        value: The range, as above.
        kind: ``float``, ``int`` or ``str``.
        log: Sample the range on a log scale (values must be > 0).
        minimum: The smallest allowed value, or ``None``.
        choices: The allowed values, for ``str`` spaces.
    """

    def __init__(self, name, value, kind=float, log=False, minimum=None, choices=None):
        self.name, self.kind, self.log = name, kind, log
        if isinstance(value, tuple):
            if len(value) != 2 or not all(isinstance(v, numbers.Real) for v in value):
                raise ValueError(
                    f"`{name}` range must be a (low, high) pair of numbers; received {value!r}."
                )
            if value[0] > value[1]:
                raise ValueError(f"`{name}` range {value!r} has low > high; swap them.")
            values = list(value)
        elif isinstance(value, list):
            if not value:
                raise ValueError(
                    f"`{name}` is an empty choice; give at least one value, e.g. "
                    f"{list(choices) if choices else 'a list of numbers'}."
                )
            values = value
        else:
            values = [value]
        for v in values:
            if choices is not None and v not in choices:
                raise ValueError(f"`{name}` value {v!r} is not one of {list(choices)}.")
            if log and not v > 0:
                raise ValueError(f"`{name}` values must be > 0; received {v!r}.")
            if minimum is not None and not v >= minimum:
                raise ValueError(f"`{name}` values must be >= {minimum}; received {v!r}.")
        self.value = value

    def declare(self, hp):
        """Declares the hyperparameter in ``hp`` and returns its value.

        If ``hp`` already holds a value under this name (e.g. fixed through
        the tuner's ``hyperparameters=``), that value wins, as keras-tuner
        does for every hyperparameter."""
        value = self.value
        if isinstance(value, tuple) and value[0] < value[1]:
            if self.kind is int:
                return hp.Int(self.name, *value)
            return hp.Float(self.name, *value, sampling="log" if self.log else "linear")
        if isinstance(value, list) and len(value) > 1:
            return hp.Choice(self.name, value)
        single = value[0] if isinstance(value, (tuple, list)) else value
        return hp.Fixed(self.name, self.kind(single))


class MarginHyperModel(kt.HyperModel):
    """Builds a compiled `marginfit.MarginModel` from a search space.

    ```python
    hypermodel = tuning.MarginHyperModel(input_shape=(8, 8, 1), num_classes=10,
                                         gamma=(1e-2, 1e4), conv_layers=[1, 2])
    tuner = keras_tuner.RandomSearch(hypermodel, objective="val_accuracy", max_trials=10)
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=5)
    ```

    Every argument below is a range: a single value fixes it, a
    ``(low, high)`` tuple is a range, a list is a choice.

    Args:
        input_shape: Shape of one example: ``(height, width, channels)``
            gives conv layers then dense layers; a flat ``(features,)`` gives
            dense layers only.
        num_classes: Number of classes (of integer labels).
        gamma: The margin (log scale).
        norm: Distance norms among ``"1"``, ``"2"``, ``"inf"``.
        margin_layers: Placements among `MARGIN_PLACEMENTS`.
        conv_layers: Number of conv layers (each 3x3, ReLU, then 2x2 max
            pooling while the image is at least 2x2); ignored for flat
            inputs.
        conv_filters: Filters of every conv layer.
        dense_layers: Number of hidden dense layers (ReLU).
        dense_units: Units of every hidden dense layer.
        lower_learning_rate: Adam rate of the lower group (conv layers, or
            the first dense layer of a flat model), log scale.
        upper_learning_rate: Adam rate of the other layers, log scale.
        ce_weight: Weight of the cross-entropy next to the margin loss
            (the margin's weight is 1).
        alpha, top_k, approximate: Fixed `LargeMargin` settings.
    """

    def __init__(
        self,
        input_shape,
        num_classes,
        gamma=(1e-2, 1e4),
        norm=["2", "inf"],
        margin_layers=list(MARGIN_PLACEMENTS),
        conv_layers=(1, 2),
        conv_filters=[8, 16, 32],
        dense_layers=(1, 2),
        dense_units=[32, 64, 128],
        lower_learning_rate=(1e-4, 1e-2),
        upper_learning_rate=(1e-4, 1e-2),
        ce_weight=(0.1, 1.0),
        alpha=4.0,
        top_k=1,
        approximate=True,
        name="margin_hypermodel",
    ):
        super().__init__(name=name)
        self.input_shape = tuple(input_shape)
        if len(self.input_shape) not in (1, 3):
            raise ValueError(
                f"`input_shape` must be (height, width, channels) or (features,); "
                f"received {self.input_shape}."
            )
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"`num_classes` must be an int >= 2; received {num_classes!r}.")
        self.num_classes = num_classes
        norm = [_norm_name(n) for n in norm] if isinstance(norm, list) else _norm_name(norm)
        self.spaces = {
            "gamma": Space("gamma", gamma, log=True),
            "norm": Space("norm", norm, kind=str, choices=NORMS),
            "margin_layers": Space("margin_layers", margin_layers, kind=str, choices=MARGIN_PLACEMENTS),
            "conv_layers": Space("conv_layers", conv_layers, kind=int, minimum=0),
            "conv_filters": Space("conv_filters", conv_filters, kind=int, minimum=1),
            "dense_layers": Space("dense_layers", dense_layers, kind=int, minimum=0),
            "dense_units": Space("dense_units", dense_units, kind=int, minimum=1),
            "lower_learning_rate": Space("lower_learning_rate", lower_learning_rate, log=True),
            "upper_learning_rate": Space("upper_learning_rate", upper_learning_rate, log=True),
            "ce_weight": Space("ce_weight", ce_weight, minimum=0),
        }
        self.margin_options = {"alpha": alpha, "top_k": top_k, "approximate": approximate}
        marginfit.LargeMargin(["input"], **self.margin_options)  # validates them now

    def build(self, hp):
        space = self.spaces
        inputs = keras.Input(self.input_shape, name="features")
        hidden_names, lower = [], []
        x = inputs
        if len(self.input_shape) == 3:
            filters = space["conv_filters"].declare(hp)
            for i in range(space["conv_layers"].declare(hp)):
                name = f"conv{i + 1}"
                x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=name)(x)
                hidden_names.append(name)
                lower.append(name)
                if min(x.shape[1:3]) >= 2:
                    x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
            x = keras.layers.Flatten(name="flatten")(x)
        units = space["dense_units"].declare(hp)
        dense_count = space["dense_layers"].declare(hp)
        if not lower and dense_count == 0:
            raise ValueError(
                "The model needs at least one hidden layer: allow "
                "`dense_layers` >= 1 (or `conv_layers` >= 1 for images)."
            )
        for i in range(dense_count):
            name = f"dense{i + 1}"
            x = keras.layers.Dense(units, activation="relu", name=name)(x)
            hidden_names.append(name)
        logits = keras.layers.Dense(self.num_classes, name="logits")(x)
        if not lower:
            lower = hidden_names[:1]

        placement = space["margin_layers"].declare(hp)
        margin_layers = _placement_layers(placement, hidden_names)
        norm = space["norm"].declare(hp)
        margin = marginfit.LargeMargin(
            margin_layers,
            gamma=space["gamma"].declare(hp),
            norm=math.inf if norm == "inf" else int(norm),
            **self.margin_options,
        )
        model = marginfit.MarginModel(inputs, logits, margin=margin)
        upper = [layer.name for layer in model.layers if layer.weights and layer.name not in lower]
        optimizer = marginfit.discriminative_optimizer(
            model,
            [
                (keras.optimizers.Adam(space["lower_learning_rate"].declare(hp), name="lower"), lower),
                (keras.optimizers.Adam(space["upper_learning_rate"].declare(hp), name="upper"), upper),
            ],
        )
        model.compile(
            optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            loss_weights=space["ce_weight"].declare(hp),
            metrics=["accuracy"],
        )
        return model


def _norm_name(norm):
    """``"1"``, ``"2"`` or ``"inf"`` for a norm given as a number or string."""
    for name in NORMS:
        if str(norm) == name or (isinstance(norm, numbers.Real) and float(norm) == float(name)):
            return name
    raise ValueError(f"`norm` must be 1, 2 or inf (or their strings); received {norm!r}.")


def _placement_layers(placement, hidden_names):
    """Margin layer names for a placement such as ``"input+last_hidden"``."""
    layers = []
    for part in placement.split("+"):
        if part == "input":
            layers.append("input")
        elif part == "last_hidden":
            layers.extend(hidden_names[-1:])
        else:
            layers.extend(hidden_names)
    if not layers:
        raise ValueError(
            f"Margin placement {placement!r} names no layer of a model without "
            "hidden layers; include 'input' or add hidden layers."
        )
    return layers
