"""Optimizers: per-layer-group optimizers on Keras' own `MultiOptimizer`,
and `BacktrackingSGD`, an SGD variant with slot variables."""

import re

import keras
from keras import ops

from marginfit import _keras_internals

_FORBIDDEN_INNER = (keras.optimizers.MultiOptimizer, keras.optimizers.LossScaleOptimizer)


def discriminative_optimizer(model, groups, default=None, name=None):
    """A `keras.optimizers.MultiOptimizer` giving each layer group its own
    optimizer (discriminative learning rates).

    ```python
    optimizer = marginfit.discriminative_optimizer(model, [
        (keras.optimizers.Adam(2e-3, name="features"), ["conv1", "conv2"]),
        (keras.optimizers.Nadam(1e-3, name="head"), ["dense", "logits"]),
    ])
    model.compile(optimizer, loss)
    ```

    The result is Keras' own `MultiOptimizer` over an `OptimizerMap` whose
    keys are escaped, exact variable-path patterns, so it saves and reloads
    (`.keras`, checkpoints) with every sub-optimizer's state. Every
    trainable variable of the model is checked to reach the optimizer of its
    group before the optimizer is returned.

    Args:
        model: A built `keras.Model`.
        groups: A sequence of ``(optimizer, layers)`` pairs; ``layers`` is a
            layer name, a `keras.layers.Layer`, or a list of them. Nested
            layers are found by name or by path (``"block/dense"``); a layer
            brings all its trainable variables, nested ones included.
        default: Optimizer for the trainable variables of no group. Without
            it every trainable variable must belong to a group, and the first
            group's optimizer also takes variables created later.
        name: Name of the `MultiOptimizer`.

    Returns:
        A `keras.optimizers.MultiOptimizer`; its ``optimizers`` are the
        groups' optimizers (and ``default``), each with a distinct name,
        because callbacks log rates as ``learning_rate_<optimizer name>``.

    Raises:
        ValueError: If the model is not built, a group names no layer of the
            model, a layer has no trainable variable, a variable is in two
            groups, an optimizer is repeated or names collide, or, without
            ``default``, a trainable variable is in no group.
    """
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so its variables are not "
            "known yet. Build it first: give it a `keras.Input`, call it on a "
            "batch, or call `model.build(input_shape)`."
        )
    groups = [_checked_group(group, position) for position, group in enumerate(groups)]
    if not groups:
        raise ValueError("`groups` is empty: give at least one (optimizer, layers) pair.")
    _check_optimizers([optimizer for optimizer, _ in groups], default)

    finder = _LayerFinder(model)
    variables_of_group = []
    owner = {}  # id(variable) -> (group position, layer name)
    for position, (_, layers) in enumerate(groups):
        group_variables = []
        for layer in layers:
            layer = finder.find(layer, position)
            if not layer.trainable_variables:
                raise ValueError(
                    f"Layer {layer.name!r} in group {position} has no trainable "
                    "variables (it has no weights or is frozen). Remove it from "
                    "the group."
                )
            for variable in layer.trainable_variables:
                if id(variable) in owner:
                    other_position, other_layer = owner[id(variable)]
                    raise ValueError(
                        f"Variable {variable.path!r} is in group {other_position} "
                        f"(layer {other_layer!r}) and in group {position} (layer "
                        f"{layer.name!r}). Put each layer in one group only."
                    )
                owner[id(variable)] = (position, layer.name)
                group_variables.append(variable)
        variables_of_group.append(group_variables)

    unassigned = [v.path for v in model.trainable_variables if id(v) not in owner]
    if unassigned and default is None:
        raise ValueError(
            f"Trainable variables {unassigned} belong to no group. Add their "
            "layers to a group, or pass `default=` an optimizer for them."
        )

    optimizers = [optimizer for optimizer, _ in groups]
    expected = {
        id(variable): optimizers[owner[id(variable)][0]] if id(variable) in owner else default
        for variable in model.trainable_variables
    }
    for exact in (False, True):
        optimizer_map = _optimizer_map(optimizers, variables_of_group, default, exact)
        clashes = _misrouted(optimizer_map, model.trainable_variables, expected)
        if not clashes:
            return keras.optimizers.MultiOptimizer(optimizer_map, name=name)
    raise ValueError(
        f"Variables {clashes} share their paths with variables of another "
        "group, so no path pattern can tell them apart. Give the layers that "
        "hold them unique names."
    )


def _checked_group(group, position):
    if not (isinstance(group, (tuple, list)) and len(group) == 2):
        raise ValueError(
            f"Group {position} must be an (optimizer, layers) pair; received {group!r}."
        )
    optimizer, layers = group
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(f"Group {position} names no layer.")
    return optimizer, layers


def _check_optimizers(optimizers, default):
    everyone = optimizers + ([] if default is None else [default])
    for optimizer in everyone:
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
            optimizer, _FORBIDDEN_INNER
        ):
            raise ValueError(
                "Each group needs its own plain Keras optimizer instance (not a "
                f"MultiOptimizer or LossScaleOptimizer); received {optimizer!r}."
            )
    if len({id(optimizer) for optimizer in everyone}) < len(everyone):
        raise ValueError(
            "The same optimizer instance serves two groups (or a group and "
            "`default`). Merge those groups, or create one optimizer per group."
        )
    names = [optimizer.name for optimizer in everyone]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"Optimizer names {repeated} are used by more than one group; "
            "callbacks log each group's rate as `learning_rate_<name>`, so "
            "equal names would overwrite each other. Name them, e.g. "
            "`keras.optimizers.Adam(1e-3, name='head')`."
        )


class _LayerFinder:
    """Finds a model's layers, nested ones included, by name, path or object."""

    def __init__(self, model):
        self.model = model
        self.layers = _keras_internals.flatten_layers(model)

    def find(self, layer, position):
        if isinstance(layer, keras.layers.Layer):
            if not any(layer is known for known in self.layers):
                raise ValueError(
                    f"Layer {layer.name!r} in group {position} is not a layer "
                    f"of model {self.model.name!r}."
                )
            return layer
        if not isinstance(layer, str):
            raise ValueError(
                f"Group {position} lists {layer!r}; layers are given by name, "
                "path or `keras.layers.Layer` object."
            )
        matches = [known for known in self.layers if layer in (known.name, known.path)]
        if not matches:
            raise ValueError(
                f"Group {position} names layer {layer!r}, which model "
                f"{self.model.name!r} does not have. Its layers are: "
                f"{[known.path for known in self.layers]}."
            )
        if len(matches) > 1:
            raise ValueError(
                f"Layer name {layer!r} in group {position} is ambiguous: "
                f"{[known.path for known in matches]}. Give the layer's path."
            )
        return matches[0]


def _optimizer_map(optimizers, variables_of_group, default, exact):
    """An `OptimizerMap` with one full-match pattern per group.

    Without a `default`, the first group's optimizer is the map's default and
    needs no pattern: every optimizer then appears once in the config, which
    keeps it identical after reloading.
    """
    mapped = list(zip(optimizers, variables_of_group))
    if default is None:
        default = optimizers[0]
        mapped = mapped[1:]
    patterns = {_group_pattern(variables, exact): optimizer for optimizer, variables in mapped}
    return keras.optimizers.OptimizerMap(default, patterns)


def _group_pattern(variables, exact):
    """A regex full-matching the paths of ``variables``: per-layer prefixes
    (``conv1/.+``) unless ``exact``, else the escaped paths themselves."""
    paths = [variable.path for variable in variables]
    if exact:
        alternatives = paths
    else:
        alternatives = sorted({path.rsplit("/", 1)[0] + "/" for path in paths})
    escaped = [re.escape(alternative) for alternative in alternatives]
    if not exact:
        escaped = [prefix + ".+" for prefix in escaped]
    return "|".join(escaped) if len(escaped) > 1 else escaped[0]


def _misrouted(optimizer_map, variables, expected):
    """Paths of ``variables`` that the map sends to the wrong optimizer."""
    wrong = []
    for variable in variables:
        try:
            routed = optimizer_map[variable.path]
        except ValueError:  # several patterns match
            routed = None
        if routed is not expected[id(variable)]:
            wrong.append(variable.path)
    return wrong


@keras.saving.register_keras_serializable(package="marginfit")
class BacktrackingSGD(keras.optimizers.Optimizer):
    """SGD that steps back where the gradient changed sign.

    For every weight element, with gradient ``g``, the previous step's
    gradient ``g_prev`` and the weights before the previous step ``w_prev``:

    ```python
    w = (w_prev + w) / 2   if g * g_prev < 0   # overshot: step back halfway
    w = w - learning_rate * g                  # otherwise: plain SGD
    ```

    The first step is plain SGD. Slot variables ``previous_weight`` and
    ``previous_gradient`` (one per model variable) are saved with the
    optimizer.

    Args:
        learning_rate: A float, a `keras.optimizers.schedules` schedule or a
            callable. Defaults to ``0.01``.
        **kwargs: The base optimizer's arguments (``clipnorm``,
            ``weight_decay``, ``name``, ...).
    """

    def __init__(self, learning_rate=0.01, name="backtracking_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.previous_weights = self.add_optimizer_variables(variables, "previous_weight")
        self.previous_gradients = self.add_optimizer_variables(variables, "previous_gradient")

    def update_step(self, gradient, variable, learning_rate):
        """Updates one variable as the class docstring says
        (`keras.optimizers.Optimizer.update_step`)."""
        index = _keras_internals.variable_index(self, variable)
        previous_weight = self.previous_weights[index]
        previous_gradient = self.previous_gradients[index]
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        current = ops.convert_to_tensor(variable)
        sign_changed = ops.less(ops.multiply(gradient, previous_gradient), 0)
        updated = ops.where(
            sign_changed,
            ops.divide(ops.add(previous_weight, current), 2),
            ops.subtract(current, ops.multiply(learning_rate, gradient)),
        )
        self.assign(previous_weight, current)
        self.assign(previous_gradient, gradient)
        self.assign(variable, updated)
