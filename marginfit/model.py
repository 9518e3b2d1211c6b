"""`MarginModel`: a `keras.Model` whose `fit()`/`evaluate()` add the margin."""

import dataclasses
import inspect
import types
import warnings

import keras
import numpy as np

from marginfit import _keras_internals, backend, checks, taps
from marginfit import distances as distances_lib
from marginfit import margin as margin_lib
from marginfit.callbacks import DeadExamplesWarning, NonFiniteStepError
from marginfit.margin import INPUT, LargeMargin
from marginfit.metrics import MarginMetrics, StepCount

_OUTPUT_KINDS = ("logits", "probabilities")
NONFINITE_POLICIES = ("skip", "raise", "apply")
"""What `MarginModel` does with a non-finite step: skip its update and count
it (``"skip"``), skip it and stop `fit()` with an error (``"raise"``), or
apply it like a plain Keras model (``"apply"``)."""
# First half of the stateless seed of sampled competitors; the second is the
# training step (0 in evaluation).
_DRAW_SEED = 0x5EED
# The same for the random start of the training adversary.
_ATTACK_SEED = 0xA77AC


@dataclasses.dataclass
class Forward:
    """What the recorded forward pass of the margin computes
    (`MarginModel._margin_pass`, recorded by `backend.record`)."""

    outputs: object
    """``[batch, classes]`` model outputs."""
    targets: list
    """The margin layers' ``[batch, ...]`` activations (the input's included)."""
    differences: dict
    """``{"loss": [batch, top_k], "logits": [batch, k]}`` score differences
    (each only where asked for), differentiated w.r.t. ``targets``."""
    batch: object
    """This replica's `backend.global_batch`."""


@dataclasses.dataclass
class MarginPass:
    """What one forward pass gives the margin (`MarginModel._margin_pass`)."""

    outputs: object
    """``[batch, classes]`` model outputs."""
    distances: list = None
    """The loss's ``[batch, competitors]`` distances per margin layer."""
    dead: object = None
    """``[batch]`` bool: the examples no gradient of the loss can move."""
    boundaries: list = None
    """``[batch]`` `distances.boundary_distances` per margin layer."""
    balance: object = None
    """The class-balance term (a scalar)."""


@keras.saving.register_keras_serializable(package="marginfit")
class MarginModel(backend.MarginTrainer, keras.Model):
    """A Keras model trained with the large-margin penalty of Elsayed et al.

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

    The training loss is the compiled loss (none with ``loss=None``) plus
    ``margin.weight * margin_loss`` (the hinge terms plus ``margin.balance``
    times the class-balance term) plus the regularization losses. The logs
    of `fit()` and `evaluate()` add ``ce_loss`` (the compiled loss),
    ``margin_loss`` and ``dead_rate`` to ``loss`` and the compiled metrics;
    evaluation (and so ``val_`` logs) adds ``distance_<layer>``: the mean
    signed distance to the nearest decision boundary, in the layer's units
    (`distances.boundary_distances`, measured in inference mode), and, with
    ``space="logits"``, ``violation_rate`` (see `marginfit.metrics`).
    `predict()` is the plain forward pass.

    A training step whose loss or any gradient is not finite changes no
    weight and no optimizer state (``on_nonfinite`` says what else happens);
    the ``nonfinite_steps`` log counts such steps per epoch.

    A subclassed model with margins on hidden layers accepts
    ``return_activations=False`` in `call` and, when it is True, returns
    ``(outputs, {layer_name: activation})`` (see `call_with_activations`).

    Args:
        margin: A `LargeMargin` (or its config dict), or None for a plain
            model with the same API.
        output: What the model emits: ``"logits"`` or ``"probabilities"``.
        on_nonfinite: What a step with a non-finite loss or gradient does:
            ``"skip"`` (the default) skips its update and training goes on
            (a NaN loss still makes the epoch's ``loss`` log NaN, so that
            `keras.callbacks.TerminateOnNaN` stops training where given);
            ``"raise"`` skips the update and stops `fit()` with a
            `FloatingPointError` naming the epoch and batch; both count
            such steps in the ``nonfinite_steps`` log. ``"apply"`` applies
            every update, as a plain Keras model does, without checking or
            counting. A `keras.optimizers.LossScaleOptimizer` skips such
            steps itself (and lowers its scale), so it gets every step.
        adversary: A `marginfit.attacks.PGD` to train against (PGD
            adversarial training, Madry et al. 2018): each training batch is
            replaced by its perturbation, drawn from the step count; the
            margin, if any, then acts on the perturbed batch. Evaluation uses
            the inputs as given. None (the default) trains on the inputs.
        *args: As for `keras.Model`.
        **kwargs: As for `keras.Model`.
    """

    def __new__(cls, *args, **kwargs):
        if _keras_internals.functional_init_arguments(args, kwargs):
            cls = _keras_internals.functional_class(cls)
        return super().__new__(cls, *args, **kwargs)

    # `*args`/`**kwargs` exactly: Keras revives Functional subclasses from
    # their config only with this signature.
    def __init__(
        self,
        *args,
        margin=None,
        output="logits",
        on_nonfinite="skip",
        adversary=None,
        **kwargs,
    ):
        if _keras_internals.functional_init_arguments(args, kwargs):
            _keras_internals.init_functional(self, args, kwargs)
        else:
            super().__init__(*args, **kwargs)
        if isinstance(margin, dict):
            margin = keras.saving.deserialize_keras_object(margin)
        if margin is not None and not isinstance(margin, LargeMargin):
            raise TypeError(
                f"`margin` must be a `marginfit.LargeMargin` or None; received {margin!r}."
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
        if adversary is not None:
            adversary = _checked_adversary(adversary)
        self.margin = margin
        self.adversary = adversary
        self.output_kind = output
        self.on_nonfinite = on_nonfinite
        # Whether step logs need the shape [1] (see `_multi_worker`).
        self._vector_logs = False
        # Training batches to pass over, set when resuming mid-epoch
        # (`marginfit.BackupAndRestore`).
        self.steps_to_skip = 0
        self.nonfinite_steps = StepCount(name="nonfinite_steps")
        # Holds the Functional that also returns the margin activations; kept
        # out of Keras' tracking so that it adds nothing to saving or summary.
        self._taps = types.SimpleNamespace(model=None, layers=())
        # The traced functions of `margin_distances`, by number of competitors
        # (in a namespace, out of Keras' tracking).
        self._functions = types.SimpleNamespace(nearest={})
        self.margin_metrics = MarginMetrics(margin) if margin else None
        if margin is not None and self._is_functional:
            self._build_activation_model()
        elif margin is not None:
            self._check_subclass_call()
        if adversary is not None and self._is_functional:
            self._check_one_float_input("The adversary")

    @classmethod
    def wrap(cls, model, margin, output="logits", name=None, adversary=None):
        """A `MarginModel` over the layers (and weights) of a built model.

        Args:
            model: A built Functional or Sequential `keras.Model`. Its layers
                are shared, not copied.
            margin: The `LargeMargin` to train with.
            output: What the model emits: ``"logits"`` or ``"probabilities"``.
            name: Name of the new model (default: the wrapped model's name).
            adversary: A `marginfit.attacks.PGD` to train against, or None.
        """
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError):
            inputs = outputs = None
        if inputs and outputs:
            # As the model was built (one tensor, or its list or dict), so
            # that the wrapped model takes and serves what the model did.
            if isinstance(model, _keras_internals.Functional):
                inputs, outputs = model.input, model.output
            else:
                (inputs,), (outputs,) = inputs, outputs
        else:
            raise ValueError(
                f"Cannot wrap model {model.name!r}: it has no symbolic inputs "
                "and outputs. Wrap a Functional model or a Sequential model "
                "that starts with `keras.Input(...)`; for a subclassed model, "
                "subclass `MarginModel` and let `call` accept "
                "`return_activations` (see `MarginModel.call_with_activations`)."
            )
        return cls(
            inputs,
            outputs,
            margin=margin,
            output=output,
            name=name or model.name,
            adversary=adversary,
        )

    def get_config(self):
        config = super().get_config()
        config["margin"] = (
            None if self.margin is None else keras.saving.serialize_keras_object(self.margin)
        )
        config["output"] = self.output_kind
        config["on_nonfinite"] = self.on_nonfinite
        config["adversary"] = (
            None if self.adversary is None else keras.saving.serialize_keras_object(self.adversary)
        )
        return config

    @property
    def _is_functional(self):
        return isinstance(self, _keras_internals.Functional)

    # ----------------------------------------------------------- activations

    def call_with_activations(self, inputs, training=None, hook=None):
        """Forward pass that also returns the margin layers' activations.

        Functional and wrapped models get this for free. A subclassed model
        with margins on hidden layers lets `call` return them on request, so
        that one forward pass (through Keras' `__call__`, which builds the
        model and passes `training` on) serves both:

        ```python
        class Net(marginfit.MarginModel):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.hidden = keras.layers.Dense(64, activation="relu")
                self.logits = keras.layers.Dense(10)

            def call(self, inputs, training=None, return_activations=False):
                hidden = self.hidden(inputs)
                logits = self.logits(hidden)
                if return_activations:
                    return logits, {"hidden": hidden}
                return logits
        ```

        Args:
            inputs: The model inputs.
            training: Whether the forward pass runs in training mode.
            hook: None, or ``hook(name, activation) -> activation``, which
                replaces each margin layer's output for the layers after it
                (`taps.run_with_hooks`; a Functional model's graph only).

        Returns:
            ``(outputs, activations)``: the ``[batch, classes]`` outputs and a
            dict from margin layer name to its ``[batch, ...]`` activation.
            The model input (``"input"``) need not be in the dict.
        """
        hidden = [name for name in self.margin.layers if name != INPUT]
        if hook is not None and hidden:
            if not self._is_functional:
                raise NotImplementedError(
                    f"On the {keras.backend.backend()} backend a margin on hidden "
                    f"layers ({hidden}) needs a Functional model. Build the model "
                    "from `keras.Input(...)`, or wrap it with `MarginModel.wrap`, "
                    "or use the TensorFlow backend."
                )
            return taps.run_with_hooks(self, inputs, hidden, hook, training)
        if self._taps.model is not None:
            outputs, *activations = self._taps.model(inputs, training=training)
            return outputs, dict(zip(self._taps.layers, activations))
        if hidden:
            return self(inputs, training=training, return_activations=True)
        return self(inputs, training=training), {}

    def _check_subclass_call(self):
        """A subclassed model with hidden margin layers must be able to
        return their activations."""
        hidden = [name for name in self.margin.layers if name != INPUT]
        parameters = inspect.signature(type(self).call).parameters
        if hidden and "return_activations" not in parameters:
            raise TypeError(
                f"{type(self).__name__}.call() cannot return the activations of "
                f"margin layer(s) {hidden}. Add `return_activations=False` to "
                "its arguments and, when it is True, return `(outputs, "
                "{layer_name: activation})` (see "
                "`MarginModel.call_with_activations`)."
            )

    def _build_activation_model(self):
        """Validates the margin against the graph; builds the taps model."""
        if len(self.outputs) != 1:
            raise ValueError(
                f"MarginModel needs exactly one classification output; model "
                f"{self.name!r} has {len(self.outputs)}. Give it a single "
                "[batch, classes] output."
            )
        self._check_output_shape(self.outputs[0].shape)
        if self.output_kind == "logits" and taps.ends_in_softmax(self):
            warnings.warn(
                f"MarginModel(output='logits') received model {self.name!r}, whose "
                "output is made by a softmax, so it emits probabilities, not logits. "
                "Pass output='probabilities', or remove the softmax.",
                stacklevel=3,
            )
        if INPUT in self.margin.layers:
            self._check_one_float_input("The margin on 'input'")
        hidden = [name for name in self.margin.layers if name != INPUT]
        self._taps.model = taps.tap_model(self, hidden, _check_activation)
        self._taps.layers = tuple(hidden)

    def _check_one_float_input(self, what):
        """The margin on ``"input"`` (or the adversary) needs one
        floating-point input."""
        if len(self.inputs) != 1:
            raise ValueError(
                f"{what} needs a model with one input; model "
                f"{self.name!r} has {len(self.inputs)}. Put the margin on a "
                "layer after the inputs are merged."
            )
        dtype = keras.backend.standardize_dtype(self.inputs[0].dtype)
        if not keras.backend.is_float_dtype(dtype) and what == "The adversary":
            raise TypeError(
                f"The adversary needs floating-point inputs to perturb, but model "
                f"{self.name!r} takes {dtype} inputs (e.g. token ids), which have no "
                "gradient. Train against an adversary on float inputs only."
            )
        if not keras.backend.is_float_dtype(dtype):
            embeddings = taps.embedding_layers(self)
            where = (
                f"the layer that embeds them: {embeddings[0]!r}"
                if len(embeddings) == 1
                else f"one of the layers that embed them: {embeddings}"
                if embeddings
                else "the first layer with a floating-point output"
            )
            raise TypeError(
                f"{what} needs floating-point inputs, but model "
                f"{self.name!r} takes {dtype} inputs (e.g. token ids), which have no "
                f"gradient. Put the margin on {where}, instead of 'input'."
            )

    def _check_output_shape(self, shape):
        shape = tuple(shape)
        if len(shape) != 2 or shape[-1] is None or shape[-1] < 2:
            raise ValueError(
                f"MarginModel needs a [batch, classes] output with at least 2 "
                f"classes; model {self.name!r} outputs shape {shape}."
            )
        if self.margin.top_k > shape[-1] - 1:
            raise ValueError(
                f"`top_k={self.margin.top_k}` exceeds the {shape[-1] - 1} "
                f"competitors of a {shape[-1]}-class output. Use top_k <= "
                f"{shape[-1] - 1}."
            )

    # ------------------------------------------------------------ the margin

    def _forward(self, x, y, sample_weight, training, tape=None):
        """The forward pass of one step, with the margin.

        Returns ``(y_pred, penalty)``: the ``[batch, classes]`` outputs and
        ``(margin_loss, dead, distances)``: `margin.margin_loss` (plus the
        class-balance term of the global batch), the dead examples of
        `distances.layer_distances` and, in evaluation, the
        `distances.boundary_distances` (None in training); None without a
        margin. ``tape`` is the TensorFlow tape of the weights' gradients.
        """
        if self.margin is None:
            return self(x, training=training), None
        if y is None:
            raise ValueError(
                "MarginModel needs labels: pass `y` to fit()/evaluate(), or a "
                "dataset of (x, y) pairs."
            )
        if training and self.margin.coupling == "inference":
            # The inference pass runs first, so that it sees the moving
            # statistics as they were before this step's training pass.
            margin_pass = self._margin_pass(x, y, False, tape, "fresh")
            y_pred = self(x, training=True)
            balance = self._balance(y_pred, sample_weight)
        else:
            margin_pass = self._margin_pass(
                x,
                y,
                training,
                tape,
                "fresh" if training else "fixed",
                sample_weight,
                with_balance=True,
                boundaries=0 if training else margin_lib.LOGGED_COMPETITORS,
            )
            y_pred, balance = margin_pass.outputs, margin_pass.balance
        margin_loss = margin_lib.margin_loss(margin_pass.distances, self.margin, sample_weight)
        if balance is not None:
            margin_loss += self.margin.balance * balance
        return y_pred, (margin_loss, margin_pass.dead, margin_pass.boundaries)

    def _balance(self, y_pred, sample_weight, batch=None):
        """The class-balance term of the global batch (None with
        ``margin.balance=0``); ``batch``, the `backend.global_batch` that
        already holds its sums, saves the all-reduce."""
        if not self.margin.balance:
            return None
        if batch is None:
            sums = margin_lib.balance_sums(y_pred, self.output_kind, sample_weight)
            batch = backend.global_batch(keras.ops.shape(y_pred)[0], sums)
        return margin_lib.balance_from_sums(batch.sums)

    def _margin_pass(
        self,
        x,
        y,
        training,
        outer_tape,
        draws,
        sample_weight=None,
        with_balance=False,
        boundaries=0,
        with_loss=True,
    ):
        """One forward pass and what the margin needs of it: a `MarginPass`
        whose loss terms (`distances.layer_distances`) come ``with_loss``,
        whose class-balance term comes ``with_balance`` and whose
        `distances.boundary_distances` come from the ``boundaries``
        highest-scoring competitors (none, and None, for 0).

        ``draws`` chooses sampled competitors: ``"fresh"`` (a training step)
        or ``"fixed"`` (a fixed seed, for evaluation). The backend records
        the forward pass and gives the gradients (`backend.record`).
        """
        margin = self.margin
        if INPUT in margin.layers:
            if keras.tree.is_nested(x):
                raise ValueError(
                    "The margin on 'input' needs a single input tensor; the "
                    "model received a nested structure."
                )
            x = backend.as_input(x)
        sampled = margin.competitors == "sampled" and with_loss

        def forward(x, hook):
            if hook is not None and INPUT in margin.layers:
                x = hook(INPUT, x)
            y_pred, activations = self.call_with_activations(x, training=training, hook=hook)
            if self._taps.model is None:
                self._check_output_shape(y_pred.shape)
            labels = backend.class_indices(y, y_pred.shape[-1])
            # One all-reduce (with several replicas) for the balance term's
            # sums and the competitors' positions in the global batch.
            batch = backend.global_batch(
                keras.ops.shape(y_pred)[0],
                sums=(
                    margin_lib.balance_sums(y_pred, self.output_kind, sample_weight)
                    if with_balance and margin.balance
                    else None
                ),
                positions=sampled,
            )
            differences = {}
            if with_loss:
                differences["loss"] = margin_lib.score_differences(
                    y_pred,
                    labels,
                    margin.top_k,
                    margin.space,
                    self.output_kind,
                    self._competitor_draws(y_pred, batch.offset, draws) if sampled else None,
                )
            if boundaries:
                differences["logits"] = margin_lib.score_differences(
                    y_pred,
                    labels,
                    min(boundaries, y_pred.shape[-1] - 1),
                    "logits",
                    self.output_kind,
                )
            missing = [n for n in margin.layers if n != INPUT and n not in activations]
            if missing:
                raise ValueError(
                    f"Margin layer(s) {missing} are not among the activations "
                    f"returned by `call(..., return_activations=True)`: "
                    f"{sorted(activations)}. Return each margin layer's output "
                    "under its name."
                )
            targets = [x if name == INPUT else activations[name] for name in margin.layers]
            for name, target in zip(margin.layers, targets):
                _check_floating(name, target.dtype)
            return Forward(y_pred, targets, differences, batch)

        persistent = (with_loss and margin.top_k > 1) or bool(boundaries)
        recorded, gradients = backend.record(self, forward, x, outer_tape, persistent)
        result = MarginPass(recorded.outputs)
        if with_loss:
            result.distances, result.dead = distances_lib.layer_distances(
                gradients, recorded.differences["loss"], margin
            )
        if boundaries:
            result.boundaries = distances_lib.boundary_distances(
                gradients, recorded.differences["logits"], margin
            )
        if with_balance:
            result.balance = self._balance(recorded.outputs, sample_weight, recorded.batch)
        return result

    def _competitor_draws(self, y_pred, offset, draws):
        """``[batch, classes]`` random keys choosing sampled competitors (see
        `_margin_pass`): each example's keys depend on its position
        ``offset + i`` in the global batch and on the step, whatever the
        number of replicas."""
        seed = self._step_seed(_DRAW_SEED, draws)
        return backend.uniform_keys(keras.ops.shape(y_pred)[0], y_pred.shape[-1], seed, offset)

    def _attack_seed(self):
        """The stateless seed of the training adversary's random start."""
        return self._step_seed(_ATTACK_SEED, "fresh")

    def _step_seed(self, first, draws):
        """``(first, step)``: a stateless seed whose second half is the
        training step for ``"fresh"`` draws (0 for ``"fixed"`` ones). A
        function of the step count, which checkpoints hold: a restored model
        draws what the uninterrupted one would have."""
        step = 0
        if draws == "fresh" and self.optimizer is not None:
            step = self.optimizer.iterations + 1
        return first, step

    def margin_distances(
        self, x, y=None, batch_size=256, competitors=margin_lib.NEAREST_COMPETITORS
    ):
        """Each example's signed distance to the nearest decision boundary
        at every margin layer, in the units of the layer (pixels at the
        input) and the margin's norm, in inference mode: the first-order
        distance of the logits, ``(z_y - z_j) / ||grad (z_y - z_j)||``, to
        the nearest of the ``competitors`` highest-scoring other classes
        ``j`` (`distances.boundary_distances`), whatever space the loss is
        taken in. With every other class (the default, for up to 10
        classes) it is exact for a linear model;
        `marginfit.attacks.minimal_perturbation` measures the real distance
        at the input. The ``distance_<layer>`` logs are the mean of these
        with ``competitors=1`` (one backward pass per batch).

        Args:
            x: The inputs, in any form `fit()` takes: an ``[n, ...]`` array, a
                list or dict of arrays for a model with several inputs, or a
                `tf.data.Dataset` (or `keras.utils.PyDataset`, or generator)
                of ``(x, y)`` batches, with ``y`` left None.
            y: ``[n]`` labels (or one-hot ``[n, classes]``) for array inputs.
            batch_size: Examples per batch, for array inputs.
            competitors: Number of highest-scoring classes, other than the
                label, whose boundaries are searched (one backward pass
                each); capped at the number of other classes.

        Returns:
            ``{layer name: [n] float32 numpy array}``.
        """
        if self.margin is None:
            raise ValueError(
                "This MarginModel has no margin; give it a `margin` (or wrap "
                "the model with `MarginModel.wrap(model, margin=...)`)."
            )
        if not (
            isinstance(competitors, int) and not isinstance(competitors, bool) and competitors >= 1
        ):
            raise ValueError(f"`competitors` must be an integer >= 1; received {competitors!r}.")
        checks.check_data(self, x, y, name="margin_distances()")
        if competitors not in self._functions.nearest:

            def nearest(xb, yb):
                margin_pass = self._margin_pass(
                    xb, yb, False, None, "fixed", boundaries=competitors, with_loss=False
                )
                return margin_pass.boundaries

            self._functions.nearest[competitors] = backend.traced(self, nearest)
        parts = []
        for batch in _keras_internals.batches(x, y, batch_size):
            xb, yb, _ = keras.utils.unpack_x_y_sample_weight(batch)
            if yb is None:
                raise ValueError(
                    "margin_distances() needs labels: pass `y` with array inputs, "
                    "or a dataset of (x, y) batches."
                )
            parts.append(self._functions.nearest[competitors](xb, yb))
        return {
            name: np.concatenate([np.asarray(part[k]) for part in parts])
            for k, name in enumerate(self.margin.layers)
        }

    # ----------------------------------------------------------- the steps

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, with checks: with a margin, arrays (or a
        dataset's first batch) are checked first (`marginfit.checks`) and it
        warns once when most examples are dead for the margin
        (`DeadExamplesWarning`); with ``on_nonfinite="raise"`` a non-finite
        step stops it (`NonFiniteStepError`)."""
        bound = self._checked_arguments(keras.Model.fit, args, kwargs, "fit()")
        given = bound.arguments
        validation = given.get("validation_data")
        if self.margin is not None and validation is not None:
            if not isinstance(validation, (tuple, list)):
                validation = (validation,)
            checks.check_data(self, *validation, name="fit(validation_data=...)")
        added = [DeadExamplesWarning()] if self.margin is not None else []
        if self.on_nonfinite == "raise":
            added.append(NonFiniteStepError())
        callbacks = given.get("callbacks") or []
        if isinstance(callbacks, keras.callbacks.CallbackList):
            for callback in added:
                callbacks.append(callback)
        else:
            callbacks = [*callbacks, *added]
        given["callbacks"] = callbacks
        with checks.clear_step_errors():
            return super().fit(*bound.args[1:], **bound.kwargs)

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate`; with a margin, arrays (or a dataset's first
        batch) are checked first (`marginfit.checks`)."""
        self._checked_arguments(keras.Model.evaluate, args, kwargs, "evaluate()")
        with checks.clear_step_errors():
            return super().evaluate(*args, **kwargs)

    def _checked_arguments(self, method, args, kwargs, name):
        """``method``'s arguments bound to ``(self, *args, **kwargs)``, after
        `checks.check_data` of their ``x``, ``y`` and ``sample_weight``
        (with a margin)."""
        bound = inspect.signature(method).bind_partial(self, *args, **kwargs)
        given = bound.arguments
        if self.margin is not None:
            checks.check_data(
                self, given.get("x"), given.get("y"), given.get("sample_weight"), name
            )
        return bound

    def _loss(self, x, y, y_pred, sample_weight, penalty, training):
        """`compute_loss` (the compiled and regularization losses, or a
        user's override) plus the margin term; updates the loss logs.

        On TensorFlow, Keras scales `compute_loss` per replica (the replicas'
        gradients are summed); the margin term is scaled the same way, and
        the logs get unscaled values.
        """
        replicas = backend.replicas_in_sync()
        keras_loss = self._keras_loss(x, y, y_pred, sample_weight, training)
        loss = keras_loss
        batch_size = keras.ops.shape(y_pred)[0]
        if penalty is not None:
            margin_loss, dead, boundaries = penalty
            loss = keras_loss + self.margin.weight * margin_loss / replicas
            self.margin_metrics.update(
                keras_loss * replicas, margin_loss, dead, batch_size, boundaries, sample_weight
            )
        tracker = _keras_internals.loss_tracker(self)
        tracker.update_state(loss * replicas, sample_weight=batch_size)
        return loss

    def _keras_loss(self, x, y, y_pred, sample_weight, training):
        """`compute_loss` as float32; 0 when a margin model has nothing else
        to compute (``compile(loss=None)``, no regularization)."""
        overridden = type(self).compute_loss is not keras.Model.compute_loss
        if self.margin is not None and self.loss is None and not self.losses and not overridden:
            return keras.ops.zeros((), "float32")
        loss = self.compute_loss(x, y, y_pred, sample_weight, training=training)
        return keras.ops.cast(loss, "float32")

    def _logs(self, x, y, y_pred, sample_weight, training, count):
        """`compute_metrics`, with ``nonfinite_steps`` only if ``count`` and
        the margin's evaluation metrics only out of ``training``."""
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if not count:
            logs.pop("nonfinite_steps", None)
        if training and self.margin_metrics is not None:
            for name in self.margin_metrics.evaluation_names:
                logs.pop(name, None)
        return logs


def _checked_adversary(adversary):
    """A `marginfit.attacks.PGD` from itself or its config."""
    from marginfit import attacks

    if isinstance(adversary, dict):
        adversary = keras.saving.deserialize_keras_object(adversary)
    if not isinstance(adversary, attacks.PGD):
        raise TypeError(
            f"`adversary` must be a `marginfit.attacks.PGD` or None; received {adversary!r}."
        )
    return adversary


def _check_activation(name, tensor):
    """A margin layer's output must be one floating-point tensor."""
    if not isinstance(tensor, keras.KerasTensor):
        raise ValueError(
            f"Margin layer {name!r} returns {type(tensor).__name__}, "
            "not one tensor. Choose a layer that returns one tensor."
        )
    _check_floating(name, tensor.dtype)


def _check_floating(layer_name, dtype):
    """Distances need gradients, which only floating-point tensors have."""
    dtype = keras.backend.standardize_dtype(dtype)
    if not keras.backend.is_float_dtype(dtype):
        if layer_name == INPUT:
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
