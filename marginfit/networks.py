"""The classifier that `marginfit train/compare`, `marginfit.tuning` and the
benchmarks build: conv layers (for images), dense layers, logits."""

import collections
import functools
import math

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
    lower: Names of the layers with weights in the lower optimizer group:
        the conv layers (and their batch norms), or the first dense layer of
        a network without conv layers.
"""


def classifier(
    input_shape,
    num_classes,
    conv_filters=(32, 64),
    kernel_size=3,
    dense_units=(128,),
    margin_after_pooling=False,
    batchnorm=False,
    l2=0.0,
    l1=0.0,
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
        batchnorm: Normalize each conv and dense layer's pre-activations
            (`keras.layers.BatchNormalization`, layers ``<name>_norm``); the
            layer ``<name>`` is then the ReLU after it.
        l2: Weight of the L2 penalty ``l2 * sum(w ** 2)`` on every kernel
            and bias (0: none).
        l1: Weight of the L1 penalty ``l1 * sum(|w|)`` on every kernel and
            bias (0: none).

    Returns:
        A `Network`.
    """
    input_shape = check_shape(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="features")
    x, hidden, conv = inputs, [], []
    penalty = {}
    if l1 or l2:
        make = functools.partial(keras.regularizers.L1L2, l1) if l1 else keras.regularizers.L2
        penalty = {"kernel_regularizer": make(l2), "bias_regularizer": make(l2)}

    def relu_layer(make, name, x):
        """The layer ``make(**options)`` (linear) then ReLU, with batch norm
        in between; returns the output and the names of the weighted layers."""
        if not batchnorm:
            return make(activation="relu", name=name, **penalty)(x), [name]
        x = make(name=f"{name}_linear", **penalty)(x)
        x = keras.layers.BatchNormalization(name=f"{name}_norm")(x)
        return keras.layers.ReLU(name=name)(x), [f"{name}_linear", f"{name}_norm"]

    if len(input_shape) == 3:
        for i, filters in enumerate(conv_filters, start=1):
            make = functools.partial(keras.layers.Conv2D, filters, kernel_size, padding="same")
            x, weighted = relu_layer(make, f"conv{i}", x)
            conv += weighted
            tap = f"conv{i}"
            if min(x.shape[1:3]) >= 4:
                x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
                tap = f"pool{i}" if margin_after_pooling else tap
            hidden.append(tap)
        x = keras.layers.Flatten(name="flatten")(x)
    first_dense = []
    for i, units in enumerate(dense_units, start=1):
        x, weighted = relu_layer(functools.partial(keras.layers.Dense, units), f"dense{i}", x)
        first_dense = first_dense or weighted
        hidden.append(f"dense{i}")
    if not hidden:
        raise ValueError(
            "The network needs at least one hidden layer: give `dense_units` "
            "(or `conv_filters` for images) at least one entry."
        )
    logits = keras.layers.Dense(num_classes, name="logits", **penalty)(x)
    return Network(inputs, logits, tuple(hidden), tuple(conv or first_dense))


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


PLACEMENTS = (INPUT, "last_hidden", "all_hidden")
"""The parts of a margin placement, ``+``-joined (see `margin_layers`)."""


def check_placement(placement):
    """The parts of ``placement`` (see `margin_layers`); `ValueError` for an
    unknown one."""
    parts = placement.split("+")
    for part in parts:
        if part not in PLACEMENTS:
            raise ValueError(
                f"Unknown margin placement {part!r} in {placement!r}; use "
                "'input', 'last_hidden', 'all_hidden' or '+'-joined combinations."
            )
    return parts


def margin_layers(network, placement="input+all_hidden"):
    """Margin layer names for a placement: ``"input"``, ``"last_hidden"``,
    ``"all_hidden"`` or ``+``-joined combinations of them."""
    names = []
    for part in check_placement(placement):
        chosen = {
            INPUT: [INPUT],
            "last_hidden": list(network.hidden[-1:]),
            "all_hidden": list(network.hidden),
        }[part]
        names += [name for name in chosen if name not in names]
    return names


def _adam(rate, name, **averaging):
    return keras.optimizers.Adam(rate, name=name, **averaging)


def _authors_rmsprop(rate, name, **averaging):
    """The authors' optimizer: RMSProp (epsilon 1e-2) with the rate decayed
    by 0.96 every 2000 steps and gradients clipped to global norm 5."""
    schedule = keras.optimizers.schedules.ExponentialDecay(rate, 2000, 0.96, staircase=True)
    return keras.optimizers.RMSprop(
        schedule, epsilon=1e-2, global_clipnorm=5.0, name=name, **averaging
    )


OPTIMIZERS = {"adam": _adam, "rmsprop": _authors_rmsprop}
"""Optimizer kinds of `two_group_optimizer`: ``(rate, name, **averaging) ->
optimizer``, where ``averaging`` is Keras' ``use_ema`` and ``ema_momentum``."""


def two_group_optimizer(model, network, lower_rate, upper_rate, kind="adam", ema_momentum=None):
    """One optimizer for the network's lower layers (named ``"features"``)
    and one for the rest (``"head"``), on `discriminative_optimizer`.

    ``kind`` is a key of `OPTIMIZERS`: ``"adam"``, or ``"rmsprop"`` (the
    authors' RMSProp with its decay; its norm clipping applies per group).
    ``ema_momentum`` in [0, 1), if given, makes both keep Keras' moving
    average of the weights (``use_ema``), which ``fit()`` leaves in the
    model when it ends.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {kind!r}; use one of {sorted(OPTIMIZERS)}.")
    averaging = {}
    if ema_momentum is not None:
        if not 0 <= ema_momentum < 1:
            raise ValueError(
                f"`ema_momentum` must be in [0, 1); received {ema_momentum!r}. "
                "Use None to keep no average of the weights."
            )
        averaging = {"use_ema": True, "ema_momentum": float(ema_momentum)}
    upper = [
        layer.name for layer in model.layers if layer.weights and layer.name not in network.lower
    ]
    return discriminative_optimizer(
        model,
        [
            (OPTIMIZERS[kind](lower_rate, "features", **averaging), list(network.lower)),
            (OPTIMIZERS[kind](upper_rate, "head", **averaging), upper),
        ],
    )


def margin_classifier(
    network,
    margin,
    lower_rate=1e-3,
    upper_rate=1e-3,
    ce_weight=0.0,
    optimizer="adam",
    ema_momentum=None,
    loss=None,
    adversary=None,
    update_rule=None,
):
    """The network as a compiled `MarginModel` with `two_group_optimizer`.

    Args:
        network: A `Network`.
        margin: A `LargeMargin` (or another `marginfit.Penalty`), or None
            for plain cross-entropy.
        lower_rate: Learning rate of the lower group (see `two_group_optimizer`).
        upper_rate: Learning rate of the upper group.
        ce_weight: Weight of the cross-entropy next to the penalty (0: the
            penalty alone). Ignored without a penalty (cross-entropy alone).
        optimizer: The optimizer kind of both groups (see `OPTIMIZERS`).
        ema_momentum: None, or the momentum in [0, 1) of the moving average
            of the weights that the optimizers keep and ``fit()`` ends with
            (see `two_group_optimizer`).
        loss: The loss in place of the cross-entropy (on logits), or None.
        adversary: A `marginfit.attacks.PGD` to train against, or None.
        update_rule: A `marginfit.UpdateRule` (e.g. `marginfit.SAM`), or None.
    """
    if not ce_weight >= 0:
        raise ValueError(f"`ce_weight` must be >= 0; received {ce_weight!r}.")
    model = MarginModel(
        network.inputs, network.logits, penalty=margin, adversary=adversary,
        update_rule=update_rule,
    )  # fmt: skip
    optimizer = two_group_optimizer(model, network, lower_rate, upper_rate, optimizer, ema_momentum)
    if margin is not None and ce_weight == 0:
        model.compile(optimizer, loss=None, metrics=["accuracy"])
    else:
        model.compile(
            optimizer,
            loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            loss_weights=ce_weight if margin is not None else 1.0,
            metrics=["accuracy"],
        )
    return model


def layer_sizes(network, names):
    """Number of activations per example of each named layer (``"input"``
    for the input): the authors' ``layer_weights`` for the inf norm."""
    model = keras.Model(network.inputs, network.logits)
    shapes = [
        network.inputs.shape if name == INPUT else model.get_layer(name).output.shape
        for name in names
    ]
    return [float(math.prod(shape[1:])) for shape in shapes]
