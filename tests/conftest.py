"""Shared set-up of the test suite."""

import os

# Quiet TensorFlow's C++ start-up logs: effective only before TensorFlow is
# imported, which conftest.py precedes. Worker processes inherit it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
