"""Every use of Keras' private API in marginfit, in one place.

Each entry says why no public API serves; `verify()` checks that the installed
Keras still has them and names what changed if not (run by the test suite).

- Functional construction (`Functional`, `Trainer.__init__`,
  `functional_init_arguments`): `keras.Model.__init__` builds a subclass
  called with ``(inputs, outputs)`` by rewriting the *class's* bases to
  include `Functional`, for good, so that every later subclassed use of the
  class breaks. Here a functional call gets its own class ``(cls,
  Functional)``, serialized under ``cls``'s registered name.
- `MetricsList` and a metric's ``_direction``: Keras' monitoring callbacks
  (`EarlyStopping`, `ReduceLROnPlateau`, `ModelCheckpoint`) in
  ``mode="auto"`` read ``_direction`` only from metrics grouped in a
  `MetricsList` (or the compiled metrics).
- ``Trainer._loss_tracker``: the metric behind the ``loss`` log, which a
  `train_step` override updates exactly as Keras' own does.
- ``Layer._flatten_layers``: the only way to reach nested layers of custom
  layers (``model.layers`` lists the top level only).
- ``Optimizer._get_variable_index``: how an optimizer finds the slot
  variables of a model variable in `update_step` (Keras' own optimizers use
  it; there is no public equivalent).
- A Functional's graph (``Function._run_through_graph``, a Sequential's
  ``_functional``, an operation's ``_inbound_nodes``): the taps model of a
  margin inside a nested model calls the nested model's layers in the outer
  graph (`marginfit.taps`); Keras' public graph tools (`clone_model`,
  ``Model(inputs, layer.output)``) keep a nested model's layers in its own
  graph, which the outer inputs do not reach. On JAX the margin layers'
  gradients come from running the graph with a perturbation added at each
  margin layer (`run_graph`, with Functional's ``_standardize_inputs`` and
  ``operation_fn``, which passes ``training`` on as `Functional.call` does).
- ``data_adapters.get_data_adapter``: how `fit()` turns every input form it
  takes (arrays, lists and dicts of arrays, datasets, `PyDataset`,
  generators) into batches; `MarginModel.margin_distances` takes the same.
"""

import keras

_SUPPORTED = "keras>=3.15.1,<3.16"

try:
    from keras.src.models.functional import Functional
    from keras.src.models.functional import operation_fn as _operation_fn
    from keras.src.models.model import functional_init_arguments
    from keras.src.trainers.compile_utils import MetricsList
    from keras.src.trainers.data_adapters import get_data_adapter
    from keras.src.trainers.trainer import Trainer
except ImportError as error:  # pragma: no cover - depends on the Keras version
    raise ImportError(
        f"marginfit needs Keras internals that Keras {keras.__version__} does "
        f"not have ({error}). Install a supported Keras: pip install "
        f"'{_SUPPORTED}'."
    ) from error

__all__ = [
    "Functional",
    "MetricsList",
    "batches",
    "declare_direction",
    "flatten_layers",
    "functional_class",
    "graph_of",
    "inbound_nodes",
    "functional_init_arguments",
    "init_functional",
    "loss_tracker",
    "variable_index",
    "verify",
]

_FUNCTIONAL_CLASSES = {}


def functional_class(cls):
    """``cls`` with `Functional` mixed in; one class per ``cls``."""
    if issubclass(cls, Functional):
        return cls
    if cls not in _FUNCTIONAL_CLASSES:

        def from_config(_, config, custom_objects=None):
            return cls.from_config(config, custom_objects=custom_objects)

        functional = type(
            cls.__name__,
            (cls, Functional),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "from_config": classmethod(from_config),
            },
        )
        registered_name = keras.saving.get_registered_name(cls)
        if ">" in registered_name:
            package, name = registered_name.split(">", 1)
            keras.saving.register_keras_serializable(package, name)(functional)
        _FUNCTIONAL_CLASSES[cls] = functional
    return _FUNCTIONAL_CLASSES[cls]


def init_functional(model, args, kwargs):
    """What `keras.Model.__init__` does for ``(inputs, outputs)``, without
    rewriting the class."""
    Trainer.__init__(model)
    Functional.__init__(model, *args, **kwargs)


def declare_direction(metric, direction):
    """Tells Keras' callbacks whether higher (``"up"``) or lower (``"down"``)
    values of ``metric`` are better."""
    metric._direction = direction
    return metric


def loss_tracker(model):
    """The `keras.metrics.Mean` behind the ``loss`` log of a compiled model."""
    return model._loss_tracker


def flatten_layers(model):
    """Every layer inside ``model``, nested ones included, in order."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def batches(x, y=None, batch_size=None):
    """The batches `fit()` would make of ``(x, y)``, unshuffled: a
    `tf.data.Dataset` (on TensorFlow) or an iterator of numpy arrays, of
    ``(x, y)`` or ``(x, y, sample_weight)`` tuples."""
    adapter = get_data_adapter(x, y, batch_size=batch_size, shuffle=False)
    if keras.backend.backend() == "tensorflow":
        return adapter.get_tf_dataset()
    return adapter.get_numpy_iterator()


def graph_of(model):
    """The Functional graph of a Functional or a built Sequential model, whose
    ``_run_through_graph(inputs, call_fn=...)`` calls ``call_fn(operation,
    *args, **kwargs)`` at each node."""
    if isinstance(model, keras.Sequential):
        if model._functional is None:
            raise ValueError(
                f"Sequential model {model.name!r} has no graph yet: start it with "
                "`keras.Input(...)` so that its layers can carry a margin."
            )
        return model._functional
    return model


def run_graph(graph, inputs, call_fn, training):
    """Runs a Functional graph on ``inputs`` as `Functional.call` does,
    calling ``call_fn(operation, call, *args, **kwargs)`` at each node, where
    ``call`` calls ``operation`` with ``training`` passed on; returns the
    flattened outputs."""
    return graph._run_through_graph(
        graph._standardize_inputs(inputs),
        operation_fn=lambda operation: (operation, _operation_fn(operation, training=training)),
        call_fn=lambda pair, *args, **kwargs: call_fn(*pair, *args, **kwargs),
    )


def inbound_nodes(operation):
    """The nodes (calls) of ``operation`` in every graph it is part of."""
    return operation._inbound_nodes


def variable_index(optimizer, variable):
    """Index of ``variable`` in the slot-variable lists of ``optimizer``."""
    return optimizer._get_variable_index(variable)


def verify():
    """Checks that the installed Keras still has what this module uses.

    Raises:
        RuntimeError: Naming each missing or changed internal and the Keras
            versions marginfit supports.
    """
    problems = []

    def expect(condition, what):
        if not condition:
            problems.append(what)

    expect(callable(functional_init_arguments), "keras.src.models.model.functional_init_arguments")
    expect(issubclass(Functional, keras.Model), "keras.src.models.functional.Functional")
    expect(
        hasattr(MetricsList, "get_result"),
        "keras.src.trainers.compile_utils.MetricsList.get_result",
    )
    expect(hasattr(keras.layers.Layer, "_flatten_layers"), "keras.layers.Layer._flatten_layers")
    expect(
        hasattr(keras.optimizers.Optimizer, "_get_variable_index"),
        "keras.optimizers.Optimizer._get_variable_index",
    )
    expect(callable(get_data_adapter), "keras.src.trainers.data_adapters.get_data_adapter")
    expect(
        callable(getattr(Functional, "_run_through_graph", None)),
        "keras.src.ops.function.Function._run_through_graph",
    )
    sequential = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    expect(
        isinstance(getattr(sequential, "_functional", None), Functional),
        "keras.Sequential._functional",
    )
    expect(hasattr(keras.layers.Dense(1), "_inbound_nodes"), "keras.Operation._inbound_nodes")
    expect(
        callable(getattr(Functional, "_standardize_inputs", None)) and callable(_operation_fn),
        "keras.src.models.functional (Functional._standardize_inputs, operation_fn)",
    )
    if keras.backend.backend() == "tensorflow":
        _verify_tensorflow(expect)
    probe = _DirectionProbe()
    probe.compile(loss="mse")
    expect(
        isinstance(getattr(probe, "_loss_tracker", None), keras.metrics.Mean),
        "keras.Model._loss_tracker (a keras.metrics.Mean after compile())",
    )
    callback = keras.callbacks.EarlyStopping(monitor="val_probe")
    callback.set_model(probe)
    callback.on_train_begin()
    try:
        callback.on_epoch_end(0, {"val_probe": 1.0})
        reads_direction = callback.monitor_op is keras.ops.greater
    except ValueError:
        reads_direction = False
    expect(reads_direction, "monitoring callbacks reading `_direction` of grouped metrics")
    if problems:
        raise RuntimeError(
            f"Keras {keras.__version__} changed internals that marginfit relies "
            f"on: {problems}. Install a supported Keras ({_SUPPORTED}) or a "
            "marginfit release that supports this Keras."
        )


def _verify_tensorflow(expect):
    """The TensorFlow trainer's internals (used by `marginfit._multi_worker`)."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    for name in ("_maybe_symbolic_build", "_symbolic_build"):
        expect(
            callable(getattr(tf_trainer.TensorFlowTrainer, name, None)),
            f"keras.src.backend.tensorflow.trainer.TensorFlowTrainer.{name}",
        )
    expect(
        callable(getattr(tf_trainer, "reduce_per_replica", None)),
        "keras.src.backend.tensorflow.trainer.reduce_per_replica",
    )


class _DirectionProbe(keras.Model):
    """A model with one grouped metric that declares ``"up"``."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.grouped = MetricsList([declare_direction(keras.metrics.Mean(name="probe"), "up")])

    def call(self, inputs):
        return self.dense(inputs)
