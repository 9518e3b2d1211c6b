"""How closely the runs of a distribution test must agree.

A distribution test trains the same steps on the same global batches on one
device and split between replicas, workers or processes, in float64
(`nets.float64`): the runs differ only in the order of their sums. Moving
a sum of ``n`` float64 terms to another order changes it by at most
``(n - 1) * 2**-53`` of the terms' absolute sum (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., 2002, section 4.2), about
``2**-29`` of the float32 rounding the same training would carry. The
bound is float32's: the weights agree to the float32 epsilon of the largest
weight. Float64 rounding reaches it only if the steps amplify it 2**29-fold,
and then a float32 training would be noise; a step that computes something
else (a replica's own balance term, a competitor drawn at a local index, a
loss scaled once too often) moves the weights by a share of their change,
which each test asserts is above 1e-2.

Keras' JAX backend computes `keras.ops.mean` in float32 whatever the floatx
(its type promotion stops at 32 bits off TensorFlow), so on JAX a loss log
is a float32 mean of one batch's per-example float64 terms. A float32 mean
of ``batch`` terms moves by at most ``(batch - 1) * 2**-24`` of their
absolute mean in another order; the logs agree to ``batch`` times float32's
epsilon of the largest loss logged, with the per-example terms taken no
larger than that loss. On TensorFlow the logs are float64 throughout.
"""

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)
LOSS_LOGS = ("loss", "ce_loss", "margin_loss")


def max_difference(ours, theirs):
    """The largest absolute difference between two lists of arrays."""
    return max(float(np.abs(np.subtract(a, b)).max()) for a, b in zip(ours, theirs, strict=True))


def assert_same_weights(weights, expected):
    """``weights`` are ``expected`` (float64 runs) to float32's epsilon of
    the largest weight."""
    bound = FLOAT32_EPS * max(float(np.abs(w).max()) for w in expected)
    difference = max_difference(weights, expected)
    assert difference <= bound, f"weights differ by {difference:.3g} > {bound:.3g}"


def assert_same_logs(logs, expected, batch):
    """Every log of ``expected`` is in ``logs``, equal to ``batch`` times
    float32's epsilon of the largest of the value and the loss logs."""
    assert logs.keys() == expected.keys()
    losses = max(abs(expected[key]) for key in LOSS_LOGS if key in expected)
    for key, value in expected.items():
        bound = batch * FLOAT32_EPS * max(abs(value), losses)
        assert abs(logs[key] - value) <= bound, (key, logs[key], value, bound)


def assert_same_step(weights, expected, before, relative=1e-5):
    """``weights`` took the step ``before -> expected`` (one weight array
    each) computed by other kernels: within ``relative`` of the step's
    largest change, plus one float32 rounding of the stored weight
    (float32's epsilon of the largest), which no kernel can avoid."""
    change = float(np.abs(expected - before).max())
    bound = relative * change + FLOAT32_EPS * float(np.abs(expected).max())
    difference = float(np.abs(weights - expected).max())
    assert difference <= bound, f"weights differ by {difference:.3g} > {bound:.3g}"
    return change
