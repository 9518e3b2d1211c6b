"""`MarginModel`: a `keras.Model` whose `fit()`/`evaluate()` add a penalty."""

import inspect
import types

import keras

from marginfit import (
    _keras_internals,
    activations,
    attacks,
    backend,
    checks,
    distances,
    draws,
    ends,
    logs,
    resume,
)
from marginfit.callbacks import DeadExamplesWarning, NonFiniteStepError, ProgressBar
from marginfit.margin import LargeMargin
from marginfit.metrics import PenaltyMetrics, StepCount
from marginfit.penalty import PenaltyResult, Step, check_penalty
from marginfit.update_rule import check_update_rule

_OUTPUT_KINDS = ("logits", "probabilities")
NONFINITE_POLICIES = ("skip", "raise", "apply")
"""What `MarginModel` does with a non-finite step: skip its update and count
it (``"skip"``), skip it and stop `fit()` with an error (``"raise"``), or
apply it like a plain Keras model (``"apply"``)."""


@keras.saving.register_keras_serializable(package="marginfit")
class MarginModel(backend.MarginTrainer, keras.Model):
    """A Keras model trained with the large-margin penalty of Elsayed et al.
    (or another `marginfit.Penalty`).

    Build it like any Keras model, `compile()` it and call `fit()`:

    ```python
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    model = marginfit.MarginModel(
        inputs, logits, margin=marginfit.LargeMargin(["input", "hidden"])
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=5, validation_split=0.1)
    ```

    Each step calls the penalty once (`marginfit.penalty`): the training
    loss is `compute_loss` (the compiled and regularization losses; none
    with ``loss=None``) plus the penalty's weighted term. The logs add
    ``ce_loss`` (`compute_loss`), ``<name>_loss`` (``margin_loss``) and the
    penalty's metrics (the margin's: ``dead_rate``; in evaluation, so in
    ``val_`` logs, ``distance_<layer>``, the mean distance to the nearest
    boundary in the layer's units, and with ``space="logits"``
    ``violation_rate``; see `marginfit.metrics`). `predict()` is the plain
    forward pass. A training step whose loss or any gradient is not finite
    changes no weight and no optimizer state (``on_nonfinite``); the
    ``nonfinite_steps`` log counts them per epoch.

    A subclassed model with margins on hidden layers accepts
    ``return_activations=False`` in `call` and, when it is True, returns
    ``(outputs, {layer_name: activation})``.

    Each backend's workarounds live in its package (`marginfit.backend`).
    `keras.models.clone_model` keeps the class and every option below.

    Args:
        margin: A `LargeMargin` (or its config dict), or None.
        penalty: Another `marginfit.Penalty` (e.g.
            `marginfit.InputGradientPenalty`), or a list of penalties
            (`marginfit.Penalties`: their terms add up), in place of
            ``margin``.
        output: What the model emits: ``"logits"`` or ``"probabilities"``.
        on_nonfinite: ``"skip"`` (the default) skips a non-finite step's
            update and trains on (a NaN loss still makes the epoch's
            ``loss`` NaN, for `keras.callbacks.TerminateOnNaN`); ``"raise"``
            also stops `fit()` with a `FloatingPointError` naming the
            batch; ``"apply"`` applies every update, as a plain Keras model
            does. A `keras.optimizers.LossScaleOptimizer` gets every step
            (it skips such steps itself).
        adversary: A `marginfit.attacks.PGD` to train against (each training
            batch is replaced by its perturbation, seeded by the step
            count), or None.
        update_rule: A `marginfit.UpdateRule` (e.g. `marginfit.SAM`) that
            turns the step's gradient into the one applied, or None.
        penalty_output: In a model with several outputs, the name (layer
            name, or key of a dict of outputs) of the ``[batch, classes]``
            output the penalty applies to; None picks the only one. The
            other outputs keep their compiled losses and metrics.
        *args: As for `keras.Model`.
        **kwargs: As for `keras.Model`.
    """

    def __new__(cls, *args, **kwargs):
        if _keras_internals.is_functional_call(args, kwargs):
            cls = _keras_internals.functional_class(cls)
        return super().__new__(cls, *args, **kwargs)

    # `*args`/`**kwargs` exactly: Keras revives Functional subclasses from
    # their config only with this signature.
    def __init__(
        self, *args, margin=None, penalty=None, output="logits", on_nonfinite="skip",
        adversary=None, update_rule=None, penalty_output=None, **kwargs,
    ):  # fmt: skip
        options = (margin, penalty, output, on_nonfinite, adversary, update_rule, penalty_output)
        margin, penalty, output, on_nonfinite, adversary, update_rule, penalty_output = (
            _cloned_options(options)
        )
        if _keras_internals.is_functional_call(args, kwargs):
            _keras_internals.init_functional(self, args, kwargs)
        else:
            super().__init__(*args, **kwargs)
        self.penalty = _checked_penalty(margin, penalty, output, on_nonfinite)
        self.adversary = None if adversary is None else attacks.as_adversary(adversary)
        self.update_rule = check_update_rule(update_rule)
        self.output_kind = output
        self.on_nonfinite = on_nonfinite
        self.penalty_output = penalty_output
        self._vector_logs = False  # step logs of shape [1] (TensorFlow multi-worker)
        self.steps_to_skip = 0  # set when resuming mid-epoch (`marginfit.BackupAndRestore`)
        self.nonfinite_steps = StepCount(name="nonfinite_steps")
        # Out of Keras' tracking: adds nothing to saving or summary().
        self._untracked = types.SimpleNamespace(reach=None, traced={})
        self.penalty_metrics = PenaltyMetrics(self.penalty) if self.penalty else None
        # penalty_head(value): the penalty's output, labels or weights in `value`.
        self.penalty_head = ends.OutputChoice(self, penalty_output, self.penalty is not None)
        functional = activations.has_graph(self)
        if self.penalty is not None:
            self._untracked.reach = activations.Activations(self, self.penalty.layers)
            if functional:
                self.penalty.check_model(self)
                activations.warn_if_softmax(self, self.output_kind)
        if self.adversary is not None and functional:
            activations.check_one_float_input(self, "The adversary")

    @property
    def margin(self):
        """The `LargeMargin` this model trains with, alone or among its
        `Penalties` (None without one)."""
        members = getattr(self.penalty, "penalties", (self.penalty,))
        return next((p for p in members if isinstance(p, LargeMargin)), None)

    @classmethod
    def wrap(cls, model, margin=None, output="logits", name=None, **options):
        """A `MarginModel` over the layers (and weights) of a built
        Functional or Sequential model (shared, not copied), with the same
        inputs and outputs and the other ``options`` of `MarginModel`. A
        model with a preprocessor (a keras-hub task's) is refused: map its
        preprocessor over the data."""
        activations.check_wrappable(model)
        return cls(
            *activations.graph_ends(model), margin=margin, output=output,
            name=name or model.name, **options,
        )  # fmt: skip

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        config = super().get_config()
        alone = isinstance(self.penalty, LargeMargin)
        config["margin"] = serialize(self.penalty) if alone else None
        if self.penalty is not None and not alone:
            config["penalty"] = serialize(self.penalty)
        config["output"] = self.output_kind
        config["on_nonfinite"] = self.on_nonfinite
        config["adversary"] = None if self.adversary is None else serialize(self.adversary)
        config["update_rule"] = None if self.update_rule is None else serialize(self.update_rule)
        config["penalty_output"] = self.penalty_output
        return config

    def call_with_activations(self, inputs, training=None, hook=None):
        """``(outputs, {name: activation})``: the forward pass with the
        ``[batch, ...]`` activations of the penalty's layers (the input's
        included), each passed through ``hook(name, tensor)`` where given
        (`marginfit.activations.Activations`)."""
        return self._untracked.reach(inputs, training, hook)

    def margin_distances(
        self, x, y=None, batch_size=256, competitors=distances.NEAREST_COMPETITORS
    ):
        """``{layer name: [n] float32 array}``: each example's distance to the
        nearest decision boundary at every margin layer, in the layer's
        units, in inference mode (`marginfit.distances.margin_distances`)."""
        return distances.margin_distances(self, x, y, batch_size, competitors)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, with checks: with a penalty, arrays (or a
        dataset's first batch) are checked first (`marginfit.checks`) and a
        margin warns once when most examples are dead for it
        (`DeadExamplesWarning`); with ``on_nonfinite="raise"`` a non-finite
        step stops it (`NonFiniteStepError`); a `marginfit.BackupAndRestore`
        restores its backup, and training starts at its epoch."""
        bound = self._checked_arguments(keras.Model.fit, args, kwargs, "fit()")
        given = bound.arguments
        validation = given.get("validation_data")
        if self.penalty is not None and validation is not None:
            if not isinstance(validation, (tuple, list)):
                validation = (validation,)
            checks.check_data(self, *validation, name="fit(validation_data=...)")
        _add_callbacks(self, given)
        with checks.clear_step_errors():
            return super().fit(*bound.args[1:], **bound.kwargs)

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate`; with a penalty, arrays (or a dataset's
        first batch) are checked first (`marginfit.checks`)."""
        bound = self._checked_arguments(keras.Model.evaluate, args, kwargs, "evaluate()")
        _add_progress_bar(bound.arguments)
        with checks.clear_step_errors():
            return super().evaluate(*bound.args[1:], **bound.kwargs)

    def _checked_arguments(self, method, args, kwargs, name):
        bound = inspect.signature(method).bind_partial(self, *args, **kwargs)
        if self.penalty is not None:
            self.penalty.check_ready()
            given = bound.arguments
            checks.check_data(
                self, given.get("x"), given.get("y"), given.get("sample_weight"), name
            )
        return bound

    def make_train_function(self, force=False):
        """`keras.Model.make_train_function`, passing over the batches a
        resumed epoch already trained on (`marginfit.BackupAndRestore`)."""
        super().make_train_function(force)
        if not isinstance(self.train_function, resume.SkippingTrainFunction):
            self.train_function = resume.SkippingTrainFunction(self, self.train_function)
        return self.train_function

    def _adversarial(self, x, y):
        """The training batch's inputs: the adversary's perturbation of
        ``x``, seeded by the step count (``x`` itself without one)."""
        if self.adversary is None:
            return x
        seed = (draws.ATTACK_START, self.optimizer.iterations + 1)
        return self.adversary.perturb(self, x, self.penalty_head(y), seed=seed)

    def _penalty_term(self, x, y, sample_weight, training, gradients):
        """The step's one call of the penalty (a `PenaltyResult`; without
        one, the plain forward pass), on its output's labels and weights."""
        if self.penalty is None:
            return PenaltyResult(self(x, training=training), None, None)
        y, sample_weight = self.penalty_head(y), self.penalty_head(sample_weight)
        return self.penalty(Step(self, x, y, sample_weight, training, gradients))

    def _loss(self, x, y, term, sample_weight, training):
        """`compute_loss` plus the penalty's term; updates the loss logs. On
        TensorFlow, Keras scales `compute_loss` per replica (the replicas'
        gradients are summed): the term is scaled alike, the logs are not."""
        replicas = backend.replicas_in_sync()
        keras_loss = loss = self._keras_loss(x, y, term.outputs, sample_weight, training)
        batch_size = keras.ops.shape(keras.tree.flatten(x)[0])[0]  # as Keras weighs its loss
        if term.loss is not None:
            loss = keras_loss + (term.loss / replicas if replicas > 1 else term.loss)
            self.penalty_metrics.update(keras_loss * replicas, term, batch_size)
        tracker = _keras_internals.loss_tracker(self)
        tracker.update_state(loss * replicas, sample_weight=batch_size)
        return loss

    def _keras_loss(self, x, y, y_pred, sample_weight, training):
        """`compute_loss` as float32; 0 where a model with a penalty has
        nothing else to compute (``compile(loss=None)``, no regularization)."""
        if not logs.has_keras_loss(self):
            return keras.ops.zeros((), keras.backend.floatx())
        loss = self.compute_loss(x, y, y_pred, sample_weight, training=training)
        return keras.ops.cast(loss, keras.backend.floatx())

    def _logs(self, x, y, y_pred, sample_weight, training):
        """`compute_metrics`, keeping the names `marginfit.logs.written`
        lists for this step (besides ``loss`` and the compiled metrics)."""
        computed = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        kept = logs.written(self, training)
        ours = (logs.NONFINITE_STEPS, *(self.penalty_metrics.by_name if self.penalty else ()))
        return {k: v for k, v in computed.items() if k in kept or k not in ours}


_OPTIONS = tuple(inspect.signature(MarginModel.__init__).parameters)[2:-1]
"""`MarginModel`'s own options, in its signature's order (between
``*args`` and ``**kwargs``)."""
_DEFAULTS = tuple(inspect.signature(MarginModel.__init__).parameters[n].default for n in _OPTIONS)


def _cloned_options(options):
    """``options`` (`MarginModel`'s, in `_OPTIONS` order) or, where all are
    the defaults and `keras.models.clone_model` is building the model, the
    options of the model it clones, as new objects (from its config)."""
    if options != _DEFAULTS:
        return options
    source = _keras_internals.model_being_cloned()
    if not isinstance(source, MarginModel):
        return options
    config = source.get_config()
    return tuple(config.get(name) for name in _OPTIONS)


def _checked_penalty(margin, penalty, output, on_nonfinite):
    """The model's penalty, from ``margin`` (a `LargeMargin` or its config)
    or ``penalty``, after checking the other options."""
    if isinstance(margin, dict):
        margin = keras.saving.deserialize_keras_object(margin)
    if margin is not None and not isinstance(margin, LargeMargin):
        raise TypeError(f"`margin` must be a `marginfit.LargeMargin` or None; received {margin!r}.")
    if margin is not None and penalty is not None:
        raise ValueError(
            "Give `margin` or `penalty`, not both: to combine them, pass `penalty=[margin, other]`."
        )
    if output not in _OUTPUT_KINDS:
        raise ValueError(
            f"`output={output!r}` is not supported: say what the model "
            "emits with output='logits' or output='probabilities'."
        )
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"`on_nonfinite={on_nonfinite!r}` is not supported; use 'skip', 'raise' or 'apply'."
        )
    return margin or check_penalty(penalty)


def _add_callbacks(model, given):
    """Adds to the bound arguments ``given`` of `fit()` the callbacks the
    model's options ask for, checks what the callbacks monitor
    (`marginfit.logs.check_callbacks`), and restores the backup of a
    `marginfit.BackupAndRestore` (training then starts at its epoch)."""
    added = [DeadExamplesWarning()] if model.margin is not None else []
    if model.on_nonfinite == "raise":
        added.append(NonFiniteStepError())
    callbacks = given.get("callbacks") or []
    if isinstance(callbacks, keras.callbacks.CallbackList):
        for callback in added:
            callbacks.append(callback)
    else:
        given["callbacks"] = callbacks = [*callbacks, *added]
        _add_progress_bar(given)
    callbacks = getattr(callbacks, "callbacks", callbacks)
    logs.check_callbacks(model, callbacks)
    for callback in callbacks:
        if isinstance(callback, resume.BackupAndRestore):
            start = callback.restore(model)
            given["initial_epoch"] = max(given.get("initial_epoch", 0), start)


def _add_progress_bar(given):
    """Adds a `ProgressBar` to the bound arguments ``given`` of `fit()` or
    `evaluate()` where Keras would add its own progress bar."""
    callbacks = given.get("callbacks") or []
    if isinstance(callbacks, keras.callbacks.CallbackList) or given.get("verbose", "auto") == 0:
        return
    if not any(isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks):
        given["callbacks"] = [*callbacks, ProgressBar()]
