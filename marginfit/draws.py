"""Counter-based random numbers, written once in `keras.ops`.

A draw is a pure function of integer coordinates -- a stream (what the
numbers are for), the training step, an example's index in the global
batch, a class -- hashed by a 32-bit integer mixer. Nothing is carried from
one draw to the next, so TensorFlow (with or without XLA), JAX and PyTorch,
one device or N replicas, workers or processes, and a run restored from a
checkpoint all draw the same numbers for the same coordinates.

The mixer is Wellons' ``lowbias32`` (two xor-shift-multiply rounds, full
avalanche); the arithmetic is int32, where every backend wraps on overflow
as unsigned 32-bit arithmetic does (PyTorch has no unsigned 32-bit
multiply).
"""

import numpy as np
from keras import ops

COMPETITORS = 0x5EED
"""Stream of the sampled competitors of `marginfit.LargeMargin`."""
ATTACK_START = 0xA77AC
"""Stream of the random start of `marginfit.attacks.PGD`."""
TRADES_START = 0x7EADE5
"""Stream of the random start of `marginfit.TRADES`' inner attack."""
VAT_START = 0x5A7
"""Stream of the random start of `marginfit.VAT`'s power iteration."""


def _int32(value):
    """A Python int taken modulo 2**32, as the int32 with the same bits."""
    return int(np.array(value % 2**32, np.uint32).view(np.int32))


_MULTIPLIERS = (_int32(0x7FEB352D), _int32(0x846CA68B))
_UNIT = 2.0**-24


def _shift_right(x, bits):
    """Logical right shift of int32 bits (an arithmetic shift, masked)."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def mix(x):
    """``lowbias32`` of each int32 element (bits as unsigned 32-bit)."""
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = ops.multiply(x, ops.convert_to_tensor(_MULTIPLIERS[0], "int32"))
    x = ops.bitwise_xor(x, _shift_right(x, 15))
    x = ops.multiply(x, ops.convert_to_tensor(_MULTIPLIERS[1], "int32"))
    return ops.bitwise_xor(x, _shift_right(x, 16))


def hash_words(*words):
    """The int32 hash of integer coordinates (Python ints or int tensors,
    broadcast together), folded in one at a time."""
    state = ops.convert_to_tensor(_int32(0x9E3779B9), "int32")
    for word in words:
        if isinstance(word, int):
            word = ops.convert_to_tensor(_int32(word), "int32")
        state = mix(ops.bitwise_xor(state, ops.cast(word, "int32")))
    return state


def uniform(*words):
    """Float32 numbers in [0, 1), multiples of 2**-24, one per element of the
    broadcast coordinates (see `hash_words`)."""
    bits = _shift_right(hash_words(*words), 8)
    return ops.cast(bits, "float32") * _UNIT


def competitor_keys(step, first_index, batch_size, classes):
    """``[batch_size, classes]`` keys in [0, 1) that choose sampled
    competitors: row ``i`` holds the keys of the example at index
    ``first_index + i`` of the global batch, at training step ``step`` (0 in
    evaluation), one per class."""
    rows = ops.cast(ops.arange(batch_size), "int32") + ops.cast(first_index, "int32")
    columns = ops.arange(classes, dtype="int32")
    return uniform(COMPETITORS, step, ops.expand_dims(rows, 1), ops.expand_dims(columns, 0))


def uniform_like(x, stream, step, minval, maxval):
    """Float32 numbers in ``[minval, maxval)`` of the shape of ``x``: element
    ``k`` of the flattened ``x`` gets the draw ``(stream, step, k)``."""
    index = ops.reshape(ops.arange(ops.size(x), dtype="int32"), ops.shape(x))
    return minval + (maxval - minval) * uniform(stream, step, index)


def normal_like(x, stream, step):
    """Float32 standard normal numbers of the shape of ``x`` (Box-Muller on
    the draws ``(stream, step, k, 0)`` and ``(stream, step, k, 1)`` of the
    flattened element ``k``)."""
    index = ops.reshape(ops.arange(ops.size(x), dtype="int32"), ops.shape(x))
    radius = ops.sqrt(-2.0 * ops.log(1.0 - uniform(stream, step, index, 0)))
    return radius * ops.cos(2.0 * np.pi * uniform(stream, step, index, 1))
