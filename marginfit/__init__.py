"""marginfit: large-margin training inside plain Keras `fit()`/`evaluate()`."""

from marginfit import losses, networks
from marginfit.callbacks import (
    CatastrophicOverfitting,
    DistanceHistograms,
    GroupLearningRateScheduler,
    ProgressBar,
)
from marginfit.data import load_digits
from marginfit.distillation import Distillation
from marginfit.input_gradient import InputGradientPenalty
from marginfit.losses import HuberLoss
from marginfit.margin import LargeMargin
from marginfit.metrics import ViolationRate
from marginfit.model import MarginModel
from marginfit.optimizers import BacktrackingSGD, discriminative_optimizer
from marginfit.penalties import Penalties
from marginfit.penalty import Penalty, PenaltyResult, Step
from marginfit.resume import BackupAndRestore
from marginfit.saving import load_model, save_model
from marginfit.trades import TRADES
from marginfit.update_rule import SAM, UpdateRule
from marginfit.vat import VAT

__all__ = [
    "BackupAndRestore",
    "BacktrackingSGD",
    "CatastrophicOverfitting",
    "DistanceHistograms",
    "Distillation",
    "GroupLearningRateScheduler",
    "HuberLoss",
    "InputGradientPenalty",
    "LargeMargin",
    "MarginModel",
    "Penalties",
    "Penalty",
    "PenaltyResult",
    "ProgressBar",
    "SAM",
    "Step",
    "TRADES",
    "UpdateRule",
    "VAT",
    "ViolationRate",
    "discriminative_optimizer",
    "load_digits",
    "load_model",
    "losses",
    "networks",
    "save_model",
]
__version__ = "0.1.0"
