"""What a Functional `MarginModel` reads off its graph: its layers by path,
the taps model, the layer that makes its output, and the layers that embed
integer inputs.

The taps model is a Functional on the same layers that returns the model's
output and the activations of its margin layers, also of layers inside
nested Functional or Sequential models (the usual fine-tuning layout
``outputs = head(base(inputs))``). A margin layer is named by its name in
the model, or by its path through nested models (``"base/inner_relu"``); a
layer of a nested model may also go by its own name where no other layer
has it.
"""

import keras
from keras import tree

from marginfit import _keras_internals
from marginfit.margin import INPUT

SEPARATOR = "/"
"""Separates the names of nested models and of the layer in a path."""


def layer_paths(model, prefix=""):
    """``{path: layer}`` of every layer of ``model`` and, recursively, of the
    Functional and Sequential models nested in it, in graph order."""
    paths = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue  # the model input is "input"
        path = prefix + layer.name
        paths[path] = layer
        if _inlinable(layer):
            paths.update(layer_paths(layer, path + SEPARATOR))
    return paths


def resolve(model, names):
    """The path of each margin layer name (``"input"`` excluded).

    Raises:
        ValueError: for a name that no layer has, or a bare name that
            several nested layers share; the message lists the valid names.
    """
    paths = layer_paths(model)
    resolved, missing = {}, []
    for name in names:
        if name in paths:
            resolved[name] = name
            continue
        found = [path for path in paths if path.rsplit(SEPARATOR, 1)[-1] == name]
        if len(found) > 1:
            raise ValueError(
                f"Margin layer {name!r} is ambiguous in model {model.name!r}: it names "
                f"{found}. Name one by its path."
            )
        if found:
            resolved[name] = found[0]
        else:
            missing.append(name)
    if missing:
        raise ValueError(
            f"Margin layer(s) {missing} not found in model {model.name!r}. Name a "
            "layer of the model, or one of a model nested in it by its path "
            f"(e.g. 'base{SEPARATOR}relu'). Valid names: {[INPUT, *paths]}."
        )
    return resolved


def tap_model(model, names, check_tensor):
    """A Functional from ``model.inputs`` to ``[output, *activations]``, one
    activation per name in ``names`` (margin layer names, ``"input"``
    excluded), or None when ``names`` is empty.

    The graph of ``model`` is left as it is: its nodes are reused. A layer of
    a nested model is reached through a taps model of the nested model (its
    outputs and the activation), called in place of the nested model (the
    same layers and weights, and the same computation); the layers after it
    get new nodes on its outputs.

    Args:
        model: A Functional model with one output.
        names: Margin layer names.
        check_tensor: Called as ``check_tensor(name, value)`` on what each
            margin layer outputs; raises if it is not one float tensor.
    """
    if not names:
        return None
    paths = resolve(model, names)
    outputs, activations = _taps(model, [paths[name].split(SEPARATOR) for name in names])
    for name, activation in zip(names, activations):
        check_tensor(name, activation)
    return keras.Model(model.inputs, [outputs[0], *activations], name=f"{model.name}_taps")


def _taps(model, paths):
    """``(outputs, activations)``: symbolic tensors of ``model``'s graph, its
    flattened outputs and the output of the layer at each path (a list of
    names, relative to ``model``)."""
    graph = _keras_internals.graph_of(model)
    layers = {layer.name: layer for layer in model.layers}
    nested = {}
    for path in paths:
        if len(path) > 1:
            nested.setdefault(path[0], []).append(path[1:])
    # Walk the graph, reusing each node as it is (so a layer shared with other
    # models gives its output in this graph), but calling each nested model on
    # a path as its own taps model: a new node in this graph, whose extra
    # outputs are the activations inside it.
    found = {}
    calls = {}

    def call(operation, *args, **kwargs):
        if operation.name in nested and operation is layers.get(operation.name):
            calls[operation.name] = calls.get(operation.name, 0) + 1
            if calls[operation.name] > 1:
                raise ValueError(
                    f"Nested model {operation.name!r} is called more than once, so a "
                    "margin layer inside it has several activations. Put the margin on "
                    "a layer that is called once."
                )
            inner_graph = _keras_internals.graph_of(operation)
            inner_paths = nested[operation.name]
            inner_outputs, inner_activations = _taps(operation, inner_paths)
            taps = keras.Model(
                inner_graph.inputs, [*inner_outputs, *inner_activations], name=operation.name
            )
            results = tree.flatten(taps(*args, **kwargs))
            for inner_path, activation in zip(inner_paths, results[len(inner_outputs) :]):
                found[SEPARATOR.join([operation.name, *inner_path])] = activation
            return tree.pack_sequence_as(inner_graph.output, results[: len(inner_outputs)])
        outputs = _existing_outputs(operation, args, kwargs)
        if outputs is None:
            outputs = operation(*args, **kwargs)
        found.setdefault(operation.name, outputs)
        return outputs

    outputs = graph._run_through_graph(graph.inputs, call_fn=call)
    unreached = [SEPARATOR.join(path) for path in paths if SEPARATOR.join(path) not in found]
    if unreached:
        raise ValueError(
            f"Margin layer(s) {unreached} of model {model.name!r} are not computed "
            "from its inputs. Put the margin on a layer between the inputs and the output."
        )
    return tree.flatten(outputs), [found[SEPARATOR.join(path)] for path in paths]


def run_with_hooks(model, inputs, names, hook, training=None):
    """Runs ``model`` on ``inputs``, replacing the output of each margin
    layer by ``hook(name, output)`` for the layers downstream.

    The same computation as calling the model (its layers, in graph order,
    nested models included), with the margin layers' outputs open to
    change: the JAX backend adds a zero perturbation there and
    differentiates with respect to it.

    Args:
        model: A Functional model (or a built Sequential one).
        inputs: Its inputs, as its `call` takes them.
        names: Margin layer names (``"input"`` excluded).
        hook: ``hook(name, output) -> output``.
        training: Passed on to the layers.

    Returns:
        ``(outputs, {name: hooked output})``.
    """
    paths = resolve(model, names)
    hooked = {tuple(paths[name].split(SEPARATOR)): name for name in names}
    found = {}
    outputs = _run_hooked(model, inputs, hooked, hook, found, training)
    unreached = [name for name in names if name not in found]
    if unreached:
        raise ValueError(
            f"Margin layer(s) {unreached} of model {model.name!r} are not computed "
            "from its inputs. Put the margin on a layer between the inputs and the output."
        )
    return outputs, found


def _run_hooked(model, inputs, hooked, hook, found, training):
    graph = _keras_internals.graph_of(model)
    layers = {layer.name: layer for layer in model.layers}
    nested = {path[0] for path in hooked if len(path) > 1}

    def call(operation, call_operation, *args, **kwargs):
        if operation.name in nested and operation is layers.get(operation.name):
            inner = {
                path[1:]: name
                for path, name in hooked.items()
                if len(path) > 1 and path[0] == operation.name
            }
            if any(name in found for name in inner.values()):
                raise ValueError(
                    f"Nested model {operation.name!r} is called more than once, so a "
                    "margin layer inside it has several activations. Put the margin on "
                    "a layer that is called once."
                )
            inputs = args[0] if len(args) == 1 else list(args)
            return _run_hooked(operation, inputs, inner, hook, found, training)
        outputs = call_operation(*args, **kwargs)
        name = hooked.get((operation.name,))
        if name is None:
            return outputs
        if name in found:
            raise ValueError(
                f"Margin layer {name!r} is called more than once, so it has several "
                "activations. Put the margin on a layer that is called once."
            )
        found[name] = outputs = hook(name, outputs)
        return outputs

    outputs = _keras_internals.run_graph(graph, inputs, call, training)
    return outputs[0] if len(outputs) == 1 else outputs


def _inlinable(layer):
    return isinstance(layer, (_keras_internals.Functional, keras.Sequential))


def _existing_outputs(operation, args, kwargs):
    """The outputs of ``operation``'s node on exactly these symbolic inputs,
    if it has one; else None."""
    given = [id(x) for x in tree.flatten((args, kwargs)) if isinstance(x, keras.KerasTensor)]
    for node in _keras_internals.inbound_nodes(operation):
        if [id(x) for x in node.input_tensors] == given:
            outputs = node.output_tensors
            return outputs[0] if len(outputs) == 1 else outputs
    return None


def output_layer(model):
    """The layer that computes ``model``'s (first) output, looked for inside
    nested models; None where no layer's call made it."""
    target = _keras_internals.graph_of(model).outputs[0]
    for layer in reversed(model.layers):
        for node in _keras_internals.inbound_nodes(layer):
            if any(tensor is target for tensor in node.output_tensors):
                return output_layer(layer) if _inlinable(layer) else layer
    return None


def ends_in_softmax(model):
    """Whether ``model``'s output is made by a softmax (a `Softmax` layer, or
    a layer with ``activation="softmax"``)."""
    layer = output_layer(model)
    return isinstance(layer, keras.layers.Softmax) or (
        getattr(layer, "activation", None) is keras.activations.softmax
    )


def embedding_layers(model):
    """Names of the first layers downstream of ``model``'s inputs whose
    output is floating point: where a margin goes for integer inputs (token
    ids), e.g. an `Embedding`."""
    integer = {id(tensor) for tensor in model.inputs}
    found = []
    for layer in model.layers:
        try:
            inputs, outputs = tree.flatten(layer.input), tree.flatten(layer.output)
        except (AttributeError, ValueError):
            continue
        if isinstance(layer, keras.layers.InputLayer) or not any(
            id(tensor) in integer for tensor in inputs
        ):
            continue
        if all(keras.backend.is_float_dtype(tensor.dtype) for tensor in outputs):
            found.append(layer.name)
        else:
            integer.update(id(tensor) for tensor in outputs)
    return found
