"""Which output and which inputs a penalty works on, in a model with several.

A penalty works on one ``[batch, classes]`` output: the model's only one,
or the one `MarginModel(penalty_output=...)` names (by its layer name or
its key in a dict of outputs); the other outputs keep their compiled losses
and metrics. The model input is ``"input"`` where the model has one input
tensor (alone, or in a list or dict of one), and ``"input:<name>"`` (the
`keras.Input`'s name or its key in a dict of inputs) where it has several.
"""

import keras
from keras import tree

INPUT = "input"
"""The name that designates the model input."""

_NAMED_INPUT = INPUT + ":"


def is_input(name):
    """Whether penalty layer ``name`` designates a model input."""
    return name == INPUT or name.startswith(_NAMED_INPUT)


class OutputChoice:
    """Picks the penalty's output out of a model's outputs, and its labels
    and sample weights out of the batch's.

    Args:
        model: The `MarginModel` (Functional, or subclassed: then ``name``
            must be a key of the dict its `call` returns).
        name: The output's layer name or dict key, or None (the only
            ``[batch, classes]`` output).
        required: Whether the model has a penalty (else an ambiguous choice
            is not an error: nothing is chosen).

    Attributes:
        index: The chosen output's position in ``model.outputs`` (0 with one).
    """

    def __init__(self, model, name=None, required=True):
        self.name, self.index, self.count, self.chosen = name, 0, 1, name is not None
        if not has_graph(model):
            return
        outputs = model.outputs
        self.count = len(outputs)
        if name is None:
            if len(outputs) > 1 and required:
                self.index, self.chosen = _only_classifier(model), True
            return
        self.index = _position(model.output, model.output_names, name)
        if self.index is None:
            raise ValueError(
                f"`penalty_output={name!r}` names no output of model {model.name!r}; its "
                f"outputs are {_choices(model.output, model.output_names)}. Name one of them."
            )

    def __call__(self, value):
        """The chosen output's entry of ``value`` (outputs, labels or sample
        weights: a list or dict as the model's outputs, or one tensor,
        which is returned as it is)."""
        if isinstance(value, dict) and self.name in value:
            return value[self.name]
        if not self.chosen:
            return value
        if isinstance(value, dict) or (
            isinstance(value, (list, tuple)) and len(value) == self.count
        ):
            return tree.flatten(value)[self.index]
        if self.name is not None and isinstance(value, (list, tuple)):
            raise ValueError(
                f"`penalty_output={self.name!r}` needs the model to return a dict; it "
                f"returned {len(value)} outputs. Return a dict, or name its key."
            )
        return value


def _only_classifier(model):
    """The position of the one ``[batch, classes >= 2]`` output of ``model``;
    a `ValueError` where there are several or none."""
    shapes = [tuple(t.shape) for t in model.outputs]
    found = [i for i, s in enumerate(shapes) if len(s) == 2 and (s[-1] or 0) >= 2]
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"MarginModel's penalty needs one classification output, but model {model.name!r} "
        f"has {len(shapes)} outputs {dict(zip(model.output_names, shapes))}, "
        f"{len(found)} of them [batch, classes]. Name the one it applies to: "
        f"MarginModel(..., penalty_output={model.output_names[found[0] if found else 0]!r})."
    )


def input_index(model, name):
    """The position in ``model.inputs`` of input ``name`` (``"input"`` or
    ``"input:<name>"``); a `ValueError` that lists the names otherwise."""
    inputs = model.inputs
    if name == INPUT:
        if len(inputs) == 1:
            return 0
        raise ValueError(
            f"The margin on 'input' is ambiguous: model {model.name!r} has {len(inputs)} "
            f"inputs. Name one: {[_NAMED_INPUT + n for n in _input_names(model)]}."
        )
    index = _position(model.input, _input_names(model), name[len(_NAMED_INPUT) :])
    if index is None:
        raise ValueError(
            f"Margin layer {name!r} names no input of model {model.name!r}. Name one of "
            f"{[_NAMED_INPUT + n for n in _choices(model.input, _input_names(model))]}."
        )
    return index


def _input_names(model):
    return [t.name for t in model.inputs]


def _choices(structure, names):
    """The names a model's inputs or outputs go by: the keys of their dict,
    else the tensors' (layers') names."""
    return list(structure) if isinstance(structure, dict) else list(names)


def _position(structure, names, wanted):
    """The flat position of ``wanted`` among the tensors of ``structure``
    (a model's ``input`` or ``output``: a key of its dict, or one of the
    tensors' ``names``, in flat order), or None."""
    if isinstance(structure, dict) and wanted in structure:
        return tree.flatten({key: key == wanted for key in structure}).index(True)
    return list(names).index(wanted) if wanted in names else None


def take_input(x, name, index):
    """``(tensor, put)``: input ``name`` of the batch's inputs ``x`` (one
    tensor, or a list or dict) and ``put(tensor)``, which returns ``x``
    with that input replaced."""
    if not tree.is_nested(x):
        return keras.ops.convert_to_tensor(x), lambda tensor: tensor
    key = name[len(_NAMED_INPUT) :] if name != INPUT else None
    if isinstance(x, dict) and key in x:
        return keras.ops.convert_to_tensor(x[key]), lambda tensor: {**x, key: tensor}
    flat = tree.flatten(x)
    if index is None:  # a subclassed model: one leaf, or a dict key
        if len(flat) != 1:
            raise ValueError(
                f"The margin on {name!r} needs one input tensor, or the key of a dict of "
                f"inputs; the model received {len(flat)}. Name one as 'input:<key>'."
            )
        index = 0

    def put(tensor):
        return tree.pack_sequence_as(x, flat[:index] + [tensor] + flat[index + 1 :])

    return keras.ops.convert_to_tensor(flat[index]), put


def has_graph(model):
    """Whether ``model`` has symbolic inputs and outputs (Functional, or a
    built Sequential)."""
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False
