"""Running a keras-tuner search over `MarginHyperModel`, and its results."""

import csv
import io
import json
import os

import keras_tuner as kt

from marginfit import files, logs, metrics
from marginfit.model import MarginModel
from marginfit.tuning import distributed

TUNERS = ("random", "bayesian", "hyperband")
_HP = kt.engine.hyperparameters


def declared(hypermodel):
    """``{name: hyperparameter}`` that ``hypermodel.build`` declares with no
    value fixed (one dry build)."""
    hp = kt.HyperParameters()
    hypermodel.build(hp)
    return {entry.name: entry for entry in hp.space}


def hyperparameters(hypermodel, settings):
    """A `keras_tuner.HyperParameters` fixing or narrowing the hypermodel's
    own hyperparameters, of the kind each is declared with.

    Args:
        hypermodel: The `keras_tuner.HyperModel`.
        settings: ``{name: value}``: a single value fixes it, a ``(low,
            high)`` tuple narrows a numeric range (keeping its sampling), a
            list restricts the choices.

    Raises:
        ValueError: For a name the hypermodel does not declare (the valid
            ones are listed) or a value keras-tuner refuses.
    """
    known = declared(hypermodel)
    hp = kt.HyperParameters()
    for name, value in settings.items():
        if name not in known:
            raise ValueError(
                f"Unknown hyperparameter {name!r}; the search space has {sorted(known)}."
            )
        entry = known[name]
        kind = _value_type(entry)
        if isinstance(value, tuple):
            if not isinstance(entry, (_HP.Int, _HP.Float)) or len(value) != 2:
                raise ValueError(
                    f"{name!r} takes a (low, high) range only if it is numeric "
                    f"and ranged; give a value or a list of values instead."
                )
            low, high = (kind(bound) for bound in value)
            if low > high:
                raise ValueError(f"{name!r} range {value!r} has low > high; swap them.")
            ranged = hp.Int if isinstance(entry, _HP.Int) else hp.Float
            ranged(name, low, high, sampling=entry.sampling)
        elif isinstance(value, list):
            if not value:
                raise ValueError(f"{name!r} is an empty choice; give at least one value.")
            hp.Choice(name, [kind(item) for item in value])
        else:
            hp.Fixed(name, kind(value))
    return hp


def _value_type(entry):
    if isinstance(entry, _HP.Int):
        return int
    if isinstance(entry, _HP.Float):
        return float
    values = getattr(entry, "values", None) or [entry.default]
    return type(values[0])


def check(hypermodel, hp):
    """Builds the hypermodel at the defaults of ``hp`` and at each range's
    upper end, so that a bad value fails now, not in the middle of a search.

    Returns:
        The models built.

    Raises:
        ValueError: Naming the values that could not be built.
    """
    trials = [hp.copy()]
    for entry in hp.space:
        if isinstance(entry, (_HP.Int, _HP.Float, _HP.Choice)):
            upper = hp.copy()
            upper.values[entry.name] = (
                entry.values[-1] if isinstance(entry, _HP.Choice) else entry.max_value
            )
            trials.append(upper)
    models = []
    for trial in trials:
        try:
            models.append(hypermodel.build(trial))
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"The hyperparameters {trial.values} cannot be built: {error}"
            ) from error
    return models


def check_objective(models, name):
    """Raises a `ValueError` (`marginfit.logs.check_monitored`) when one of
    ``models`` (from `check`) does not log the objective ``name``, a log
    that marginfit writes in other configurations: before any trial runs,
    not after the first."""
    name = name.name if isinstance(name, kt.Objective) else name.partition(":")[0]
    for model in models:
        if isinstance(model, MarginModel):
            logs.check_monitored(model, name, f"The objective {name!r}")


def objective(name):
    """A `keras_tuner.Objective` for a log name.

    ``"val_margin_loss"``, ``"val_distance_input"`` and the other metrics of
    `MarginModel` get the direction they declare; ``"name:min"`` or
    ``"name:max"`` sets it for any other metric; names keras-tuner knows
    (``val_accuracy``, ``val_loss``) keep its own inference.
    """
    if isinstance(name, kt.Objective):
        return name
    name, _, direction = name.partition(":")
    if direction:
        if direction not in ("min", "max"):
            raise ValueError(f"Objective direction must be 'min' or 'max'; received {direction!r}.")
        return kt.Objective(name, direction)
    ours = metrics.direction(name)
    if ours is not None:
        return kt.Objective(name, "min" if ours == "down" else "max")
    if kt.engine.metrics_tracking.infer_metric_direction(name.removeprefix("val_")) is None:
        raise ValueError(
            f"Cannot tell whether objective {name!r} should be minimised or "
            f"maximised; write '{name}:min' or '{name}:max'."
        )
    return name


def make_tuner(
    kind,
    hypermodel,
    objective_name,
    directory,
    project_name="search",
    max_trials=10,
    epochs=5,
    overwrite=False,
    seed=0,
    hyperparameters=None,
):
    """A keras-tuner tuner of ``kind`` (one of `TUNERS`).

    ``hyperparameters`` (a `keras_tuner.HyperParameters`, e.g. from
    `hyperparameters`) fixes or narrows the search space; it is checked with
    `check` first.

    ``max_trials`` bounds RandomSearch and BayesianOptimization; Hyperband
    sizes itself from ``epochs`` (its ``max_epochs``, with factor 3). With
    ``overwrite=False`` an existing search in ``directory/project_name``
    resumes: finished trials are kept, interrupted ones are run again.
    """
    if kind not in TUNERS:
        raise ValueError(f"Unknown tuner {kind!r}; use one of {list(TUNERS)}.")
    hyperparameters = hyperparameters or kt.HyperParameters()
    check_objective(check(hypermodel, hyperparameters), objective_name)
    common = dict(
        # A distributed search retries the trial of a worker that died once
        # on another one (see `distributed.watch_workers`).
        max_retries_per_trial=1 if distributed.role() else 0,
        objective=objective(objective_name),
        seed=seed,
        hyperparameters=hyperparameters,
    )
    place = dict(directory=directory, project_name=project_name, overwrite=overwrite)
    if kind == "random":
        oracle = distributed.watched(kt.oracles.RandomSearchOracle)(max_trials=max_trials, **common)
        return _Tuner(oracle=oracle, hypermodel=hypermodel, **place)
    if kind == "bayesian":
        oracle = distributed.watched(kt.oracles.BayesianOptimizationOracle)(
            max_trials=max_trials, num_initial_points=min(2, max_trials), **common
        )
        return _Tuner(oracle=oracle, hypermodel=hypermodel, **place)
    oracle = distributed.watched(kt.oracles.HyperbandOracle)(max_epochs=epochs, factor=3, **common)
    return _HyperbandOn(oracle, hypermodel, **place)


class _Tuner(distributed.BeatingTuner, kt.Tuner):
    """keras-tuner's tuner, beating while a worker trains a trial."""


class _HyperbandOn(distributed.BeatingTuner, kt.Hyperband):
    """keras-tuner's Hyperband tuner (which trains each trial for the epochs
    its oracle gives) on an oracle of ours, beating while a worker trains a
    trial; `kt.Hyperband.__init__` only builds its own oracle."""

    def __init__(self, oracle, hypermodel, **kwargs):
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)


def results(tuner):
    """One row per finished trial, best first: ``{"trial", "score", **hyperparameters}``."""
    trials = [
        trial
        for trial in tuner.oracle.trials.values()
        if trial.status == kt.engine.trial.TrialStatus.COMPLETED and trial.score is not None
    ]
    maximise = tuner.oracle.objective.direction == "max"
    trials.sort(key=lambda trial: trial.score, reverse=maximise)
    return [
        {"trial": trial.trial_id, "score": float(trial.score), **trial.hyperparameters.values}
        for trial in trials
    ]


def best_model(tuner):
    """The best trial's model at its best epoch, weights *and* optimizer state.

    keras-tuner's `get_best_models` loads the checkpoint into a model whose
    optimizer is not built yet, so it drops the optimizer state (with a
    warning); building the optimizer first keeps it, and the model can
    continue training where the trial left it.
    """
    (trial,) = tuner.oracle.get_best_trials(1)
    model = tuner.hypermodel.build(trial.hyperparameters.copy())
    model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(tuner.get_trial_dir(trial.trial_id), "checkpoint.weights.h5"))
    return model


def format_table(rows, objective_name):
    """The rows as an aligned text table, the objective named in the header."""
    if not rows:
        return "no finished trials"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    header = [objective_name if c == "score" else c for c in columns]
    cells = [[_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_results(rows, directory):
    """Writes ``results.csv`` and ``results.json`` into ``directory``."""
    files.write_text(os.path.join(directory, "results.json"), json.dumps(rows, indent=2))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(os.path.join(directory, "results.csv"), table.getvalue())
