"""Every use of Keras' private API in marginfit, one entry per feature.

Each internal is imported on its own: one that a Keras release no longer
has disables the feature that needs it, with an error naming the feature,
the internal and the supported Keras versions, instead of breaking
``import marginfit``. `verify()` checks that the installed Keras still has
each one and still behaves as marginfit needs (the test suite runs it, on
every Keras version it supports). The design page lists each with the
reason no public API serves.
"""

import importlib
import sys

import keras

SUPPORTED = "keras>=3.15.1,<3.17"

FEATURES = {
    "functional": (
        "building a MarginModel from inputs and outputs (MarginModel(inputs, outputs) "
        "and MarginModel.wrap)",
        "keras.Model.__init__ rewrites the bases of a subclass called with (inputs, "
        "outputs) for good, which breaks every later subclassed use of the class; a "
        "functional call gets its own class (cls, Functional) instead.",
    ),
    "metric directions": (
        "the metrics of MarginModel's penalty (margin_loss, dead_rate, distance_<layer>, "
        "violation_rate, nonfinite_steps)",
        "Keras' monitoring callbacks (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint) "
        "in mode='auto' read a metric's _direction only from metrics grouped in a "
        "MetricsList or the compiled metrics.",
    ),
    "loss log": (
        "the `loss` log of MarginModel's steps",
        "Model._loss_tracker is the metric behind the `loss` log, which a train_step "
        "override updates as Keras' own steps do.",
    ),
    "nested layers": (
        "discriminative_optimizer's groups of nested layers, and the margin's error for "
        "a layer inside a custom layer",
        "Layer._flatten_layers is the only way to reach the layers nested in custom "
        "layers (Model.layers lists the top level only).",
    ),
    "optimizer slots": (
        "BacktrackingSGD's slot variables",
        "Optimizer._get_variable_index is how an optimizer's update_step finds the slots "
        "of a variable (Keras' own optimizers use it; under tf.distribute the variable "
        "given is a replica's component, which only Keras knows how to key).",
    ),
    "data adapters": (
        "MarginModel.margin_distances on every input form fit() takes",
        "get_data_adapter turns arrays, lists and dicts of arrays, datasets, PyDataset "
        "and generators into the batches fit() would make.",
    ),
    "cloning": (
        "keras.models.clone_model of a MarginModel, which keeps its penalty and options",
        "clone_model builds the clone of a Functional subclass in _clone_functional_model "
        "as model.__class__(inputs, outputs, name=...), passing none of its other "
        "arguments (its test for a custom get_config never applies: it wraps "
        "clone_function before testing it); the constructor reads the model being cloned "
        "from that caller's frame.",
    ),
    "multi-worker": (
        "fit()/evaluate() under tf.distribute.MultiWorkerMirroredStrategy",
        "Keras' TensorFlow trainer fails there for every model (keras-team/keras#20585); "
        "marginfit.backend.tensorflow.multi_worker retries its symbolic build with the "
        "worker's own batch and probes reduce_per_replica.",
    ),
}
"""Feature -> (what needs it, why no public API serves)."""

_NAMES = {
    "Functional": ("functional", "keras.src.models.functional", "Functional"),
    "Trainer": ("functional", "keras.src.trainers.trainer", "Trainer"),
    "MetricsList": ("metric directions", "keras.src.trainers.compile_utils", "MetricsList"),
    "get_data_adapter": (
        "data adapters",
        "keras.src.trainers.data_adapters",
        "get_data_adapter",
    ),
    "_clone_functional_model": (
        "cloning",
        "keras.src.models.cloning",
        "_clone_functional_model",
    ),
}
"""Name here -> (feature, module, attribute) of each imported internal."""

ATTRIBUTES = {
    "Metric._direction": "metric directions",
    "Model._loss_tracker": "loss log",
    "Layer._flatten_layers": "nested layers",
    "Optimizer._get_variable_index": "optimizer slots",
    "TensorFlowTrainer._maybe_symbolic_build": "multi-worker",
    "TensorFlowTrainer._symbolic_build": "multi-worker",
    "keras.src.backend.tensorflow.trainer.reduce_per_replica": "multi-worker",
}
"""The private attributes read or overridden, by feature (with the imports
above: every private name marginfit uses)."""


class MissingInternalError(ImportError):
    """A Keras internal that a feature needs is missing."""


def _message(feature, internal, error):
    what, _ = FEATURES[feature]
    return (
        f"{what} needs {internal}, which Keras {keras.__version__} does not have "
        f"({error}). Install a supported Keras ({SUPPORTED}), or a marginfit release "
        "that supports this one."
    )


def _missing(name, feature, internal, error):
    """A stand-in for a missing internal: a class (usable as a base) whose
    instantiation, or any call, raises `MissingInternalError`."""
    message = _message(feature, internal, error)

    class Missing:
        def __new__(cls, *args, **kwargs):
            raise MissingInternalError(message)

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)

    Missing.__name__ = Missing.__qualname__ = name
    Missing.missing = message
    return Missing


def _load(name):
    feature, module, attribute = _NAMES[name]
    internal = f"{module}.{attribute}"
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        return _missing(name, feature, internal, error)


Functional = _load("Functional")
Trainer = _load("Trainer")
MetricsList = _load("MetricsList")
get_data_adapter = _load("get_data_adapter")
_clone_functional_model = _load("_clone_functional_model")


def require(name):
    """Raises `MissingInternalError` where the internal ``name`` (a key of
    the imports above) is missing."""
    value = globals()[name]
    if getattr(value, "missing", None):
        raise MissingInternalError(value.missing)
    return value


# ------------------------------------------------------ functional


_FUNCTIONAL_CLASSES = {}


def functional_class(cls):
    """``cls`` with `Functional` mixed in; one class per ``cls``."""
    functional = require("Functional")
    if issubclass(cls, functional):
        return cls
    if cls not in _FUNCTIONAL_CLASSES:

        def from_config(_, config, custom_objects=None):
            return cls.from_config(config, custom_objects=custom_objects)

        mixed = type(
            cls.__name__,
            (cls, functional),
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
            keras.saving.register_keras_serializable(package, name)(mixed)
        _FUNCTIONAL_CLASSES[cls] = mixed
    return _FUNCTIONAL_CLASSES[cls]


def is_functional_call(args, kwargs):
    """Whether a model class is called with ``(inputs, outputs)``, as
    positional or keyword arguments (what makes `keras.Model` Functional)."""
    return (
        len(args) == 2
        or (len(args) == 1 and "outputs" in kwargs)
        or ("inputs" in kwargs and "outputs" in kwargs)
    )


def init_functional(model, args, kwargs):
    """What `keras.Model.__init__` does for ``(inputs, outputs)``, without
    rewriting the class."""
    require("Trainer").__init__(model)
    require("Functional").__init__(model, *args, **kwargs)


def model_being_cloned(depth=4):
    """The model that `keras.models.clone_model` is cloning where one of the
    ``depth`` callers of the caller is Keras' `_clone_functional_model`
    (which then calls the model class with ``(inputs, outputs, name=...)``),
    else None."""
    code = getattr(_clone_functional_model, "__code__", None)
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None or code is None:
            return None
        if frame.f_code is code:
            return frame.f_locals.get("model")
    return None


# ------------------------------------------------- the other features


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


def variable_index(optimizer, variable):
    """Index of ``variable`` in the slot-variable lists of ``optimizer``."""
    return optimizer._get_variable_index(variable)


def batches(x, y=None, batch_size=None):
    """The batches `fit()` would make of ``(x, y)``, unshuffled: a
    `tf.data.Dataset` (on TensorFlow) or an iterator of numpy arrays, of
    ``(x, y)`` or ``(x, y, sample_weight)`` tuples."""
    adapter = require("get_data_adapter")(x, y, batch_size=batch_size, shuffle=False)
    if keras.backend.backend() == "tensorflow":
        return adapter.get_tf_dataset()
    return adapter.get_numpy_iterator()


def tensorflow_trainer():
    """Keras' TensorFlow trainer module (`TensorFlowTrainer`,
    ``reduce_per_replica``), for the multi-worker workaround."""
    try:
        return importlib.import_module("keras.src.backend.tensorflow.trainer")
    except ImportError as error:
        raise MissingInternalError(
            _message("multi-worker", "keras.src.backend.tensorflow.trainer", error)
        ) from error


# ------------------------------------------------------------ checks


def verify():
    """Checks that the installed Keras still has, and still behaves as
    marginfit needs, every internal above.

    Raises:
        RuntimeError: Naming each missing or changed internal, its feature
            and the Keras versions marginfit supports.
    """
    problems = []

    def expect(condition, what, feature):
        if not condition:
            problems.append(f"{what} ({FEATURES[feature][0]})")

    for name, (feature, module, attribute) in _NAMES.items():
        expect(not getattr(globals()[name], "missing", None), f"{module}.{attribute}", feature)
    if not problems:
        expect(issubclass(Functional, keras.Model), "Functional is a keras.Model", "functional")
        expect(hasattr(MetricsList, "get_result"), "MetricsList.get_result", "metric directions")
    expect(hasattr(keras.layers.Layer, "_flatten_layers"), "Layer._flatten_layers", "nested layers")
    expect(
        hasattr(keras.optimizers.Optimizer, "_get_variable_index"),
        "Optimizer._get_variable_index",
        "optimizer slots",
    )
    if keras.backend.backend() == "tensorflow":
        try:
            trainer = tensorflow_trainer()
        except MissingInternalError:
            trainer = None
        for name in ("_maybe_symbolic_build", "_symbolic_build"):
            expect(
                callable(getattr(getattr(trainer, "TensorFlowTrainer", None), name, None)),
                f"TensorFlowTrainer.{name}",
                "multi-worker",
            )
        expect(
            callable(getattr(trainer, "reduce_per_replica", None)),
            "keras.src.backend.tensorflow.trainer.reduce_per_replica",
            "multi-worker",
        )
    if not getattr(MetricsList, "missing", None):
        _verify_behaviour(expect)
    if not getattr(_clone_functional_model, "missing", None):
        inputs = keras.Input((1,))
        probe = _CloneProbe(inputs, keras.layers.Dense(1)(inputs))
        seen = keras.models.clone_model(probe).source
        expect(
            seen is probe, "clone_model calling the class from _clone_functional_model", "cloning"
        )
    if problems:
        raise RuntimeError(
            f"Keras {keras.__version__} changed internals that marginfit relies "
            f"on: {problems}. Install a supported Keras ({SUPPORTED}) or a "
            "marginfit release that supports this Keras."
        )


def _verify_behaviour(expect):
    """The loss tracker is a Mean after compile(), and the monitoring
    callbacks read a grouped metric's direction."""
    probe = _DirectionProbe()
    probe.compile(loss="mse")
    expect(
        isinstance(getattr(probe, "_loss_tracker", None), keras.metrics.Mean),
        "Model._loss_tracker (a keras.metrics.Mean after compile())",
        "loss log",
    )
    callback = keras.callbacks.EarlyStopping(monitor="val_probe")
    callback.set_model(probe)
    callback.on_train_begin()
    try:
        callback.on_epoch_end(0, {"val_probe": 1.0})
        reads_direction = callback.monitor_op is keras.ops.greater
    except ValueError:
        reads_direction = False
    expect(
        reads_direction,
        "monitoring callbacks reading `_direction` of grouped metrics",
        "metric directions",
    )


class _CloneProbe(Functional if isinstance(Functional, type) else object):
    """A Functional subclass that records the model it is cloned from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = model_being_cloned(depth=2)


class _DirectionProbe(keras.Model):
    """A model with one grouped metric that declares ``"up"``."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.grouped = MetricsList([declare_direction(keras.metrics.Mean(name="probe"), "up")])

    def call(self, inputs):
        return self.dense(inputs)
