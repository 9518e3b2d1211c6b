"""How a step reaches the tensors a penalty differentiates with respect to:
the model input (``"input"``) and the outputs of named layers, also of
layers inside nested Functional or Sequential models (the usual
fine-tuning layout ``outputs = head(base(inputs))``), named by their path
(``"base/inner_relu"``) or, where no other layer has it, by their own name.

A Functional model reaches them through a clone on the same layers (Keras'
public `keras.models.clone_model`, sharing every layer and weight) in which
each such layer's output passes through a `Tap`: an identity layer that,
inside `recording`, hands its input to a hook and continues with what the
hook returns (TensorFlow and PyTorch record the tensor; JAX adds the zero
perturbation it differentiates with respect to). A subclassed model returns
its activations from ``call(..., return_activations=True)``.
"""

import contextlib
import inspect
import re
import threading
import warnings

import keras
from keras import tree

from marginfit import _keras_internals, ends
from marginfit.ends import INPUT, has_graph

SEPARATOR = "/"
"""Separates the names of nested models and of the layer in a path."""

_ACTIVE = threading.local()


@contextlib.contextmanager
def recording(hook):
    """A context in which every `Tap` calls ``hook(name, tensor)`` and
    continues with its result; yields ``{name: tensor}`` of the taps
    visited."""
    previous = getattr(_ACTIVE, "value", None)
    visited = {}
    _ACTIVE.value = (hook, visited)
    try:
        yield visited
    finally:
        _ACTIVE.value = previous


@keras.saving.register_keras_serializable(package="marginfit")
class Tap(keras.layers.Layer):
    """An identity layer that shows its input to the active `recording`.

    Args:
        tap_name: The name given to the hook (a margin layer's name).
        **kwargs: As for `keras.layers.Layer`.
    """

    def __init__(self, tap_name, **kwargs):
        super().__init__(**kwargs)
        self.tap_name = tap_name
        self.supports_masking = True

    def call(self, inputs):
        active = getattr(_ACTIVE, "value", None)
        if active is None:
            return inputs
        hook, visited = active
        visited[self.tap_name] = outputs = hook(self.tap_name, inputs)
        return outputs

    def get_config(self):
        return {**super().get_config(), "tap_name": self.tap_name}


# ----------------------------------------------------------- layer paths


def layer_paths(model, prefix=""):
    """``{path: layer}`` of every layer of ``model`` and, recursively, of the
    Functional and Sequential models nested in it, in graph order."""
    paths = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue  # the model input is "input"
        path = prefix + layer.name
        paths[path] = layer
        if _is_graph(layer):
            paths.update(layer_paths(layer, path + SEPARATOR))
    return paths


def resolve(model, names):
    """``{name: path}`` of each layer name (``"input"`` excluded).

    Raises:
        ValueError: for a name that no layer has, or a bare name that
            several nested layers share; the message lists the valid names.
    """
    paths = layer_paths(model)
    resolved, missing = {}, []
    for name in names:
        found = [name] if name in paths else [p for p in paths if p.split(SEPARATOR)[-1] == name]
        if len(found) > 1:
            raise ValueError(
                f"Margin layer {name!r} is ambiguous in model {model.name!r}: it names "
                f"{found}. Name one by its path."
            )
        if found:
            resolved[name] = found[0]
        else:
            missing.append(name)
    for name in missing:
        _explain_unreachable(model, name, paths)
    if missing:
        raise ValueError(
            f"Margin layer(s) {missing} not found in model {model.name!r}. Name a "
            "layer of the model, or one of a model nested in it by its path "
            f"(e.g. 'base{SEPARATOR}relu'). Valid names: {[INPUT, *paths]}."
        )
    return resolved


_GENERATED_SUFFIX = re.compile(r"_\d+$")


def _explain_unreachable(model, name, paths):
    """Raises a `ValueError` that explains why ``name`` is not in ``paths``
    where it can: a layer inside a layer that is not a graph of layers (a
    keras-hub transformer block), or a path whose prefix Keras numbered
    differently (a second ``bert_backbone`` is ``bert_backbone_1``)."""
    *outer, last = name.split(SEPARATOR)
    ordered = list(paths)
    for index, (path, layer) in enumerate(paths.items()):
        within = SEPARATOR.join(outer)
        if _is_graph(layer) or (outer and not (path + SEPARATOR).endswith(within + SEPARATOR)):
            continue
        try:
            inner = {sublayer.name for sublayer in _keras_internals.flatten_layers(layer)}
        except AttributeError:  # the internal is gone: the plain message follows
            return
        if last in inner:
            nearest = [p for p in ordered[max(index - 1, 0) : index + 2] if p != path]
            raise ValueError(
                f"Margin layer {name!r} is inside {path!r} ({type(layer).__name__}), "
                "whose call is Python code rather than a graph of layers, so the tensors "
                f"inside it cannot be reached. Put the margin on {path!r} (its output) "
                f"or on the nearest reachable layers: {nearest}."
            )

    def generic(path):
        return SEPARATOR.join(_GENERATED_SUFFIX.sub("", part) for part in path.split(SEPARATOR))

    renamed = [path for path in paths if outer and generic(path) == generic(name)]
    if renamed:
        raise ValueError(
            f"Margin layer {name!r} not found in model {model.name!r}, but {renamed[0]!r} "
            "is: Keras numbers the names of models built again in one process "
            f"('{generic(outer[0])}', then '{generic(outer[0])}_1', ...). Name the layer by "
            f"its bare name {last!r} where it is unique, or by {renamed[0]!r}."
        )


def _is_graph(layer):
    """Whether ``layer`` is a model with a graph of layers (Functional or a
    built Sequential)."""
    return isinstance(layer, keras.Model) and has_graph(layer)


def check_wrappable(model):
    """Raises a `ValueError` where `MarginModel.wrap` cannot take ``model``:
    it has no graph of layers, or a preprocessor (a keras-hub task's) that
    the wrapped model would not run."""
    if not has_graph(model):
        raise ValueError(
            f"Cannot wrap model {model.name!r}: it has no symbolic inputs "
            "and outputs. Wrap a Functional model or a Sequential model "
            "that starts with `keras.Input(...)`; for a subclassed model, "
            "subclass `MarginModel` and let `call` accept "
            "`return_activations` (see `MarginModel.call_with_activations`)."
        )
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        raise ValueError(
            f"Cannot wrap model {model.name!r} with its preprocessor "
            f"{type(preprocessor).__name__} {preprocessor.name!r}: a MarginModel "
            "would not run it. Map the preprocessor over the data and wrap the model "
            "without it: `preprocessor, model.preprocessor = model.preprocessor, None`, "
            "`MarginModel.wrap(model, ...)`, then `fit(dataset.map(preprocessor))` with "
            "a batched tf.data.Dataset (see the guide 'Models from keras-hub')."
        )


def graph_ends(model):
    """``(inputs, outputs)`` of a Functional or built Sequential model, as it
    was built (one tensor, or its list or dict)."""
    if isinstance(model, keras.Sequential):
        (inputs,), (outputs,) = model.inputs, model.outputs
        return inputs, outputs
    return model.input, model.output


# ------------------------------------------------------- the tapped clone


def tapped_model(model, names, check_tensor):
    """A Functional on ``model``'s layers (shared, with their weights) in
    which the output of each layer named in ``names`` (``"input"``
    excluded) passes through a `Tap`.

    Args:
        model: A Functional model, or a built Sequential one.
        names: Margin layer names.
        check_tensor: ``check_tensor(name, symbolic_output)``, called on what
            each named layer outputs; raises if it cannot carry a margin.

    Raises:
        ValueError: For a layer not reached from the inputs, or one called
            more than once (it would have several activations).
    """
    paths = resolve(model, names)
    wanted = {tuple(paths[name].split(SEPARATOR)): name for name in names}
    calls = {name: 0 for name in names}
    clone = _tapped(model, wanted, calls, check_tensor)
    for name, count in calls.items():
        if count == 0:
            raise ValueError(
                f"Margin layer(s) {[name]} of model {model.name!r} are not computed "
                "from its inputs. Put the margin on a layer between the inputs and the output."
            )
    return clone


def _tapped(model, wanted, calls, check_tensor):
    """`tapped_model` of ``model`` for ``wanted`` ``{path tuple: name}``,
    relative to it; counts each named layer's calls in ``calls``."""
    here = {path[0]: name for path, name in wanted.items() if len(path) == 1}
    inside = {}
    for path, name in wanted.items():
        if len(path) > 1:
            inside.setdefault(path[0], {})[path[1:]] = name
    nested, nested_calls = {}, {}

    def clone_function(layer):
        if layer.name in inside and _is_graph(layer):
            if layer.name not in nested:
                nested[layer.name] = _tapped(layer, inside[layer.name], calls, check_tensor)
            return nested[layer.name]
        return layer

    def call_function(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer is nested.get(layer.name):
            nested_calls[layer.name] = nested_calls.get(layer.name, 0) + 1
            if nested_calls[layer.name] > 1:
                _called_twice(f"Nested model {layer.name!r}", list(inside[layer.name].values()))
        name = here.get(layer.name)
        if name is None:
            return outputs
        calls[name] += 1
        if calls[name] > 1:
            _called_twice(f"Margin layer {name!r}", [name])
        check_tensor(name, outputs)
        tap = Tap(name, dtype=layer.dtype_policy, name=f"{layer.name}_margin_tap")
        return tap(outputs)

    return keras.models.clone_model(
        # A Functional on the same graph (a Sequential's too), whose inputs
        # keep their structure (one tensor, a list or a dict).
        keras.Model(*graph_ends(model), name=model.name),
        clone_function=clone_function,
        call_function=call_function,
    )


def _called_twice(what, names):
    raise ValueError(
        f"{what} is called more than once, so margin layer(s) {names} have several "
        "activations. Put the margin on a layer that is called once."
    )


# ------------------------------------------------------ what a model holds


def output_layer(model):
    """The layer that computes ``model``'s (first) output, looked for inside
    nested models; None where no layer's call made it."""
    target = model.outputs[model.penalty_head.index if hasattr(model, "penalty_head") else 0]
    for layer in reversed(model.layers):
        try:
            # What the layer's first call returned (a Functional's own
            # `output` is its graph's; `Operation.output` is its call's).
            made = any(tensor is target for tensor in tree.flatten(_call_output(layer)))
        except (AttributeError, ValueError):
            continue
        if made:
            return output_layer(layer) if _is_graph(layer) else layer
    return None


def _call_output(layer):
    return keras.Operation.output.fget(layer)


def ends_in_softmax(model):
    """Whether ``model``'s output is made by a softmax (a `Softmax` layer, or
    a layer with ``activation="softmax"``)."""
    layer = output_layer(model)
    return isinstance(layer, keras.layers.Softmax) or (
        getattr(layer, "activation", None) is keras.activations.softmax
    )


def warn_if_softmax(model, output_kind):
    """Warns where a model said to emit logits ends in a softmax."""
    if output_kind == "logits" and ends_in_softmax(model):
        warnings.warn(
            f"MarginModel(output='logits') received model {model.name!r}, whose "
            "output is made by a softmax, so it emits probabilities, not logits. "
            "Pass output='probabilities', or remove the softmax.",
            stacklevel=4,
        )


def embedding_layers(model, prefix=""):
    """Paths of the layers that embed ``model``'s integer inputs (token
    ids): the first layers, in it or in a Functional model nested in it,
    whose inputs are all integer and whose outputs are floating point, e.g.
    an `Embedding`; where a margin goes instead of ``"input"``."""
    integer = {id(t) for t in model.inputs if not keras.backend.is_float_dtype(t.dtype)}
    found = []
    for layer in model.layers:
        try:
            inputs = tree.flatten(keras.Operation.input.fget(layer))
            outputs = tree.flatten(_call_output(layer))
        except (AttributeError, ValueError):
            continue
        if isinstance(layer, keras.layers.InputLayer) or not inputs:
            continue
        if not all(id(tensor) in integer for tensor in inputs):
            continue
        if _is_graph(layer):
            found += embedding_layers(layer, prefix + layer.name + SEPARATOR)
        elif all(keras.backend.is_float_dtype(tensor.dtype) for tensor in outputs):
            found.append(prefix + layer.name)
        else:
            integer.update(id(tensor) for tensor in outputs)
    return found


def _embedding_advice(model):
    """Where the margin goes instead of ``"input"`` (for the messages)."""
    embeddings = embedding_layers(model)
    if len(embeddings) == 1:
        return f"the layer that embeds them: {embeddings[0]!r}"
    if embeddings:
        return f"one of the layers that embed them: {embeddings}"
    return "the first layer with a floating-point output"


# ------------------------------------------------------------- the reach


class Activations:
    """What a step calls to run a model and reach the named tensors.

    Args:
        model: A `MarginModel`: Functional (built from inputs and outputs,
            or wrapped), or subclassed with ``call(..., return_activations)``.
        names: The names a penalty differentiates with respect to
            (``"input"`` and layer names).
    """

    def __init__(self, model, names):
        self.model = model
        self.names = tuple(names)
        self.inputs = {name: None for name in self.names if ends.is_input(name)}
        self.hidden = tuple(name for name in self.names if name not in self.inputs)
        self.clone = None
        if has_graph(model):
            check_classifier_output(model)
            integer = _integer_inputs(model)
            for name in self.inputs:
                if name == INPUT and integer:  # token ids: the message names the embeddings
                    check_one_float_input(model, "The margin on 'input'")
                self.inputs[name] = ends.input_index(model, name)
                check_float_input(model, f"The margin on {name!r}", self.inputs[name])
            if self.hidden:
                self.clone = tapped_model(model, self.hidden, _check_activation)
        elif self.hidden:
            parameters = inspect.signature(type(model).call).parameters
            if "return_activations" not in parameters:
                raise TypeError(
                    f"{type(model).__name__}.call() cannot return the activations of "
                    f"margin layer(s) {list(self.hidden)}. Add `return_activations=False` "
                    "to its arguments and, when it is True, return `(outputs, "
                    "{layer_name: activation})` (see `MarginModel.call_with_activations`)."
                )

    def __call__(self, x, training, hook=None):
        """``(outputs, {name: activation})`` of a forward pass on ``x``,
        each named tensor passed through ``hook(name, tensor)`` (where given)
        before the layers after it see it."""
        taken = {}
        for name, index in self.inputs.items():
            tensor, put = ends.take_input(x, name, index)
            taken[name] = tensor = hook(name, tensor) if hook is not None else tensor
            x = put(tensor)
        if self.clone is not None:
            with recording(hook or (lambda name, tensor: tensor)) as found:
                outputs = self.clone(x, training=training)
        elif self.hidden:
            if getattr(hook, "perturbs", False):
                raise NotImplementedError(
                    f"On the {keras.backend.backend()} backend a margin on hidden layers "
                    f"({list(self.hidden)}) needs a Functional model. Build the model from "
                    "`keras.Input(...)`, or wrap it with `MarginModel.wrap`, or use the "
                    "TensorFlow or PyTorch backend."
                )
            outputs, found = self.model(x, training=training, return_activations=True)
            missing = [name for name in self.hidden if name not in found]
            if missing:
                raise ValueError(
                    f"Margin layer(s) {missing} are not among the activations returned by "
                    f"`call(..., return_activations=True)`: {sorted(found)}. Return each "
                    "margin layer's output under its name."
                )
            found = {name: hook(name, found[name]) if hook else found[name] for name in self.hidden}
        else:
            outputs, found = self.model(x, training=training), {}
        if self.clone is None:
            check_classifier_shape(self.model, self.model.penalty_head(outputs).shape)
        found.update(taken)
        for name in self.names:
            check_floating(name, found[name].dtype)
        return outputs, {name: found[name] for name in self.names}


def check_classifier_output(model):
    """A model with a penalty needs one ``[batch, classes]`` output (the
    one `MarginModel(penalty_output=...)` names where it has several), with
    at least 2 classes."""
    check_classifier_shape(model, model.outputs[model.penalty_head.index].shape)


def check_classifier_shape(model, shape):
    shape = tuple(shape)
    if len(shape) != 2 or shape[-1] is None or shape[-1] < 2:
        raise ValueError(
            f"MarginModel needs a [batch, classes] output with at least 2 "
            f"classes; model {model.name!r} outputs shape {shape}."
        )


def check_one_float_input(model, what):
    """An adversary (or a penalty that perturbs the input) needs one
    floating-point input."""
    if len(model.inputs) != 1:
        where = (
            _embedding_advice(model)
            if _integer_inputs(model)
            else "a layer after the inputs are merged"
        )
        raise ValueError(
            f"{what} needs a model with one input; model {model.name!r} has "
            f"{len(model.inputs)}. Put the margin on {where}, instead of 'input'."
        )
    check_float_input(model, what, 0)


def _integer_inputs(model):
    """Whether any input of ``model`` is not floating point (token ids)."""
    return not all(keras.backend.is_float_dtype(t.dtype) for t in model.inputs)


def check_float_input(model, what, index):
    """Input ``index`` of ``model`` must be floating point for ``what``."""
    dtype = keras.backend.standardize_dtype(model.inputs[index].dtype)
    if keras.backend.is_float_dtype(dtype):
        return
    if what == "The adversary":
        raise TypeError(
            f"The adversary needs floating-point inputs to perturb, but model "
            f"{model.name!r} takes {dtype} inputs (e.g. token ids), which have no "
            "gradient. Train against an adversary on float inputs only."
        )
    where = _embedding_advice(model)
    raise TypeError(
        f"{what} needs floating-point inputs, but model {model.name!r} takes {dtype} "
        f"inputs (e.g. token ids), which have no gradient. Put the margin on {where}, "
        "instead of 'input'."
    )


def _check_activation(name, tensor):
    """A margin layer's output must be one floating-point tensor."""
    if not isinstance(tensor, keras.KerasTensor):
        raise ValueError(
            f"Margin layer {name!r} returns {type(tensor).__name__}, "
            "not one tensor. Choose a layer that returns one tensor."
        )
    check_floating(name, tensor.dtype)


def check_floating(layer_name, dtype):
    """Distances need gradients, which only floating-point tensors have."""
    dtype = keras.backend.standardize_dtype(dtype)
    if keras.backend.is_float_dtype(dtype):
        return
    if ends.is_input(layer_name):
        fix = (
            "If the inputs are pixel values, cast them to float (e.g. "
            "`x.astype('float32') / 255`); if they are token ids or other "
            "indices, put the margin on the layer that embeds them (e.g. an "
            "Embedding layer) instead of 'input'."
        )
    else:
        fix = "Choose a layer with a floating-point output, or cast its output."
    raise TypeError(
        f"Margin layer {layer_name!r} outputs {dtype}, which has no gradient, "
        f"so no distance to the boundary. {fix}"
    )
