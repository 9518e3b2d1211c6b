"""The classifier that `marginfit train/compare`, `marginfit.tuning` and the
benchmarks build: conv layers (for images), dense layers, logits."""

import collections

import keras

from marginfit.margin import INPUT
from marginfit.model import MarginModel
from marginfit.optimizers import discriminative_optimizer

Network = collections.namedtuple("Network", "inputs logits hidden lower")
Network.__doc__ = """A classifier's symbolic graph and the names of its layers.

Attributes:
    inputs: The `keras.Input`.
    logits: The ``[batch, classes]`` logits tensor.
    hidden: Names of the hidden layers, input side first: ``conv<i>`` (or
        ``pool<i>`` where ``margin_after_pooling``) and ``dense<i>``.
    lower: Names of the layers of the lower optimizer group: the conv layers,
        or the first dense layer of a network without conv layers.
"""


def classifier(
    input_shape,
    num_classes,
    conv_filters=(32, 64),
    kernel_size=3,
    dense_units=(128,),
    margin_after_pooling=False,
):
    """A ReLU classifier emitting logits.

    For ``(height, width, channels)`` inputs: one ``kernel_size`` conv layer
    (``same`` padding) per entry of ``conv_filters``, each followed by 2x2 max
    pooling while its output is at least 4x4 (so pooling never goes below
    2x2); then a flatten, one dense layer per entry of ``dense_units``, and
    the logits. Flat ``(features,)`` inputs get the dense layers only.

    Args:
        input_shape: Shape of one example.
        num_classes: Number of classes (>= 2).
        conv_filters: Filters of each conv layer (ignored for flat inputs).
        kernel_size: Side of the conv kernels.
        dense_units: Units of each hidden dense layer.
        margin_after_pooling: Name the pooled outputs (``pool<i>``) as hidden
            layers instead of the conv outputs.

    Returns:
        A `Network`.
    """
    input_shape = check_shape(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="features")
    x, hidden, conv = inputs, [], []
    if len(input_shape) == 3:
        for i, filters in enumerate(conv_filters, start=1):
            x = keras.layers.Conv2D(
                filters, kernel_size, padding="same", activation="relu", name=f"conv{i}"
            )(x)
            conv.append(f"conv{i}")
            tap = f"conv{i}"
            if min(x.shape[1:3]) >= 4:
                x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
                tap = f"pool{i}" if margin_after_pooling else tap
            hidden.append(tap)
        x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(x)
        hidden.append(f"dense{i}")
    if not hidden:
        raise ValueError(
            "The network needs at least one hidden layer: give `dense_units` "
            "(or `conv_filters` for images) at least one entry."
        )
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return Network(inputs, logits, tuple(hidden), tuple(conv or hidden[:1]))


def check_shape(input_shape, num_classes):
    """``input_shape`` as a tuple, if `classifier` can build on it.

    Raises:
        ValueError: For a shape other than ``(height, width, channels)`` or
            ``(features,)``, or fewer than 2 classes.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) not in (1, 3):
        raise ValueError(
            f"`input_shape` must be (height, width, channels) or (features,); "
            f"received {input_shape}."
        )
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"`num_classes` must be an int >= 2; received {num_classes!r}.")
    return input_shape


def margin_layers(network, placement="input+all_hidden"):
    """Margin layer names for a placement: ``"input"``, ``"last_hidden"``,
    ``"all_hidden"`` or ``+``-joined combinations of them."""
    names = []
    for part in placement.split("+"):
        chosen = {
            INPUT: [INPUT],
            "last_hidden": list(network.hidden[-1:]),
            "all_hidden": list(network.hidden),
        }.get(part)
        if chosen is None:
            raise ValueError(
                f"Unknown margin placement {part!r} in {placement!r}; use "
                "'input', 'last_hidden', 'all_hidden' or '+'-joined combinations."
            )
        names += [name for name in chosen if name not in names]
    return names


def two_group_optimizer(model, network, lower_rate, upper_rate):
    """One Adam for the network's lower layers (named ``"features"``) and
    one for the rest (``"head"``), on `discriminative_optimizer`."""
    upper = [
        layer.name for layer in model.layers if layer.weights and layer.name not in network.lower
    ]
    return discriminative_optimizer(
        model,
        [
            (keras.optimizers.Adam(lower_rate, name="features"), list(network.lower)),
            (keras.optimizers.Adam(upper_rate, name="head"), upper),
        ],
    )


def margin_classifier(network, margin, lower_rate=1e-3, upper_rate=1e-3, ce_weight=0.0):
    """The network as a compiled `MarginModel` with `two_group_optimizer`.

    Args:
        network: A `Network`.
        margin: A `LargeMargin`, or None for plain cross-entropy.
        lower_rate, upper_rate: Adam learning rates of the two groups.
        ce_weight: Weight of the cross-entropy next to the margin (0: the
            margin alone). Ignored without a margin (cross-entropy alone).
    """
    if not ce_weight >= 0:
        raise ValueError(f"`ce_weight` must be >= 0; received {ce_weight!r}.")
    model = MarginModel(network.inputs, network.logits, margin=margin)
    optimizer = two_group_optimizer(model, network, lower_rate, upper_rate)
    if margin is not None and ce_weight == 0:
        model.compile(optimizer, loss=None, metrics=["accuracy"])
    else:
        model.compile(
            optimizer,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            loss_weights=ce_weight if margin is not None else 1.0,
            metrics=["accuracy"],
        )
    return model
