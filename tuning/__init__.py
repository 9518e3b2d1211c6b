"""Hyperparameter search for `marginfit.MarginModel` with keras-tuner."""

from tuning.hypermodel import MARGIN_PLACEMENTS, MarginHyperModel
from tuning.search import TUNERS, best_model, format_table, make_tuner, objective, results, write_results

__all__ = [
    "MARGIN_PLACEMENTS",
    "MarginHyperModel",
    "TUNERS",
    "best_model",
    "format_table",
    "make_tuner",
    "objective",
    "results",
    "write_results",
]
