"""What the backends whose step sees the whole global batch share (JAX,
under `keras.distribution` too, and PyTorch on one device)."""


def replicas_in_sync():
    """1: the step computes the loss of the global batch."""
    return 1


class GlobalBatch:
    """The global batch of a step that already sees all of it.

    Attributes:
        sums: The given ``[n]`` sums (None without).
        offset: 0, the index of the step's first example.
    """

    def __init__(self, sums=None):
        self.sums = sums
        self.offset = 0


def global_batch(batch_size, sums=None, positions=False):
    """The `GlobalBatch` of a step (``batch_size`` and ``positions`` are
    for the TensorFlow backend's replicas)."""
    del batch_size, positions
    return GlobalBatch(sums)
