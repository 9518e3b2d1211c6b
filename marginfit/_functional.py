"""Functional construction for a `keras.Model` subclass that also serves
subclassing.

Keras builds a `Model` subclass called with ``(inputs, outputs)`` by rewriting
the *class's* bases to include `Functional`, for good: every later subclassed
use of the class then inherits Functional's graph methods and breaks. Here a
functional call instead gets its own class ``(cls, Functional)``, serialized
under ``cls``'s registered name, and ``cls`` stays as it was.
"""

import keras
from keras.src.models.functional import Functional
from keras.src.models.model import Trainer, functional_init_arguments

_FUNCTIONAL_CLASSES = {}

__all__ = ["Functional", "functional_class", "functional_init_arguments", "init_functional"]


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
