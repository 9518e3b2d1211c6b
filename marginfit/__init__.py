"""marginfit: large-margin training inside plain Keras `fit()`/`evaluate()`."""

from marginfit.data import load_digits
from marginfit.margin import LargeMargin
from marginfit.metrics import DirectionalMean
from marginfit.model import MarginModel

__all__ = ["DirectionalMean", "LargeMargin", "MarginModel", "load_digits"]
__version__ = "0.1.0"
