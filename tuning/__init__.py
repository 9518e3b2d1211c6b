"""Hyperparameter search for `marginfit.MarginModel` with keras-tuner.

Installed as `marginfit.tuning` (from the repository's top-level `tuning/`).
"""

from marginfit.tuning.hypermodel import MARGIN_PLACEMENTS, MarginHyperModel
from marginfit.tuning.search import (
    TUNERS,
    best_model,
    check,
    declared,
    format_table,
    hyperparameters,
    make_tuner,
    objective,
    results,
    write_results,
)

__all__ = [
    "MARGIN_PLACEMENTS",
    "MarginHyperModel",
    "TUNERS",
    "best_model",
    "check",
    "declared",
    "format_table",
    "hyperparameters",
    "make_tuner",
    "objective",
    "results",
    "write_results",
]
