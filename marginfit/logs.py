"""The names in a `MarginModel`'s logs: which it writes, which of them the
progress bar shows, and a clear error for a monitored name it never writes.

Besides ``loss`` and the compiled metrics, a model with a penalty writes
``ce_loss`` (only when `compute_loss` has something to compute: a compiled
loss, a regularization loss, or an overridden `compute_loss`),
``<name>_loss`` and the penalty's metrics (`marginfit.Penalty.make_metrics`),
and, in training steps that skip non-finite updates, ``nonfinite_steps``.
"""

import keras

from marginfit import metrics

NONFINITE_STEPS = "nonfinite_steps"
_VALIDATION = "val_"


def has_keras_loss(model):
    """Whether `compute_loss` of ``model`` (a `MarginModel`) has anything
    to compute: a compiled loss, a regularization loss, or an override.
    Without one, a model with a penalty trains on the penalty alone."""
    overridden = type(model).compute_loss is not keras.Model.compute_loss
    return model.penalty is None or model.loss is not None or bool(model.losses) or overridden


def written(model, training):
    """The names ``model`` adds to ``loss`` and the compiled metrics in
    training (True) or evaluation (False) logs, without ``val_``."""
    names = []
    if model.penalty is not None:
        if has_keras_loss(model):
            names.append("ce_loss")
        if model.penalty.loss_name is not None:  # `Penalties`: each member's is its own
            names.append(model.penalty.loss_name)
        evaluation_only = model.penalty_metrics.evaluation_names
        for own in model.penalty_metrics.own_names:
            if not training or own not in evaluation_only:
                names.append(own)
    if training and model.on_nonfinite != "apply":
        names.append(NONFINITE_STEPS)
    return names


def shown(model, logs, already=()):
    """``logs`` without what tells a person nothing in this configuration:
    a quiet count (``nonfinite_steps``, the penalty's `quiet_metrics`, e.g.
    ``dead_rate``) while it is zero and not in ``already``, and the
    penalty's ``<name>_loss`` where it is the whole loss (no ``ce_loss``
    beside it and weight 1). History, CSVLogger and TensorBoard get every
    log; the progress bar and ``marginfit train``'s table get these."""
    quiet = {NONFINITE_STEPS}
    duplicate = set()
    if model.penalty is not None:
        quiet.update(model.penalty.quiet_metrics)
        if model.penalty.weight == 1.0 and model.penalty.loss_name is not None:
            duplicate.add(model.penalty.loss_name)
    kept = {}
    for name, value in logs.items():
        bare, prefix = _bare(name)
        if bare in quiet and name not in already and _is_zero(value):
            continue
        if bare in duplicate and f"{prefix}ce_loss" not in logs:
            continue
        kept[name] = value
    return kept


def check_monitored(model, name, who):
    """Raises a `ValueError` when ``name`` is a log that marginfit writes in
    some configuration but ``model`` (a `MarginModel`) never does, naming
    the logs that exist and the setting that gives ``name``. Other names
    (``loss``, compiled metrics, a callback's own) pass.

    Args:
        name: The monitored log name, e.g. ``"val_violation_rate"``.
        who: What monitors it, for the message, e.g.
            ``"EarlyStopping(monitor='val_violation_rate')"``.
    """
    bare, prefix = _bare(name)
    if not _ours(model, bare) or bare in written(model, training=not prefix):
        return
    training_names = written(model, training=True)
    evaluation_names = [_VALIDATION + n for n in written(model, training=False)]
    existing = ", ".join(["loss", *training_names, "val_loss", *evaluation_names])
    raise ValueError(
        f"{who} names a log that this model does not write: {_how_to_get(model, bare, prefix)}\n"
        f"Its logs are: {existing}, and the compiled metrics (with `val_` for "
        "validation data)."
    )


def check_callbacks(model, callbacks):
    """`check_monitored` for every callback in ``callbacks`` that has a
    string ``monitor`` (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint,
    ...)."""
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str):
            check_monitored(model, monitor, f"{type(callback).__name__}(monitor={monitor!r})")


def _bare(name):
    if name.startswith(_VALIDATION):
        return name[len(_VALIDATION) :], _VALIDATION
    return name, ""


def _is_zero(value):
    try:
        return float(keras.ops.convert_to_numpy(value)) == 0.0
    except (TypeError, ValueError):
        return False


_KNOWN = frozenset({"ce_loss", NONFINITE_STEPS, "margin_loss", "dead_rate", "violation_rate"})


def _ours(model, bare):
    """Whether marginfit writes ``bare`` in some configuration."""
    penalty_names = written(model, training=False) if model.penalty is not None else []
    return bare in _KNOWN or bare in penalty_names or bare.startswith(metrics.DISTANCE_PREFIX)


def _how_to_get(model, bare, prefix):
    """One sentence: why ``prefix + bare`` is not written, and the fix."""
    margin = model.margin
    if not prefix and bare in written(model, training=False):
        return (
            f"{bare!r} is logged in evaluation only; monitor 'val_{bare}' and "
            "pass `validation_data` to fit()."
        )
    if bare == NONFINITE_STEPS:
        if prefix:
            return f"{bare!r} counts training steps; monitor {bare!r}."
        return f"{bare!r} is not counted with on_nonfinite='apply'; use 'skip' or 'raise'."
    if bare == "ce_loss":
        return (
            "'ce_loss' is logged only where compute_loss has something to compute; "
            "compile() with a loss, e.g. loss=keras.losses.SparseCategoricalCrossentropy("
            "from_logits=True)."
        )
    if margin is None:
        return (
            f"{bare!r} is a log of the large margin; build the model with margin=LargeMargin(...)."
        )
    if bare == "violation_rate":
        return (
            "'violation_rate' is logged only where gamma is a distance, with "
            "LargeMargin(..., space='logits')."
        )
    if bare.startswith(metrics.DISTANCE_PREFIX):
        layer = bare[len(metrics.DISTANCE_PREFIX) :]
        return (
            f"distances are logged at the margin's layers {list(margin.layers)} only; "
            f"add {layer!r} to LargeMargin(layers=...)."
        )
    return f"{bare!r} is not a log of {type(model.penalty).__name__}."
