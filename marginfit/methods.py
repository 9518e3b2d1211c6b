"""The training methods that `marginfit compare` and the benchmarks set side
by side: cross-entropy, the losses robust to label noise at their authors'
published settings, the margin, and PGD adversarial training.

Every method trains the same network with the same optimizers, weight
average, validation split, seed and epochs; only the loss (or, for PGD
adversarial training, the training batches) differs. The peers' settings
are the authors' for handwritten digits (MNIST), where they published some,
and never tuned on our data:

- ``gce``: `losses.GeneralizedCrossEntropy`, q = 0.7 (Zhang & Sabuncu 2018;
  Active-Passive-Losses, Ma et al. 2020, ``configs/mnist/sym/gce.yaml``).
- ``sce``: `losses.SymmetricCrossEntropy`, alpha = 0.01, beta = 1 (Wang et
  al. 2019, MNIST; ``configs/mnist/sym/sce.yaml``).
- ``nce-rce``: `losses.NCEAndRCE`, alpha = 1, beta = 10
  (``configs/mnist/sym/nce+rce.yaml``).
- ``ce-eps-mae``: `losses.EpsilonSoftmaxCEAndMAE`, m = 1e5, alpha = 0.01,
  beta = 5 (eps-softmax ``config.py``, CIFAR-10 with symmetric noise: the
  authors published no MNIST setting).
- ``pgd-at``: the cross-entropy on PGD examples, 40 steps of 2.5 eps / 40
  from a random start (Madry et al. 2018; ``mnist_challenge``: 40 steps,
  random start), at the eps it is evaluated at.
"""

from marginfit import attacks, losses

CROSS_ENTROPY = "cross-entropy"
MARGIN = "margin"
PGD_TRAINING = "pgd-at"

PEER_LOSSES = {
    "gce": (losses.GeneralizedCrossEntropy, {"q": 0.7}),
    "sce": (losses.SymmetricCrossEntropy, {"alpha": 0.01, "beta": 1.0}),
    "nce-rce": (losses.NCEAndRCE, {"alpha": 1.0, "beta": 10.0}),
    "ce-eps-mae": (losses.EpsilonSoftmaxCEAndMAE, {"m": 1e5, "alpha": 0.01, "beta": 5.0}),
}
"""Method name -> (loss class, the authors' settings); see the module table."""

NAMES = (CROSS_ENTROPY, *PEER_LOSSES, MARGIN, PGD_TRAINING)
"""Every method, in the order the reports list them."""

PGD_STEPS = 40
"""Steps of the training attack of ``pgd-at`` (the authors' MNIST setting)."""


def check(names):
    """``names`` (a list of method names) if every one is known, without
    repeats; else `ValueError` naming the valid ones."""
    unknown = [name for name in names if name not in NAMES]
    if unknown or not names:
        raise ValueError(
            f"Unknown or no methods {unknown or names}; choose from {', '.join(NAMES)}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"Methods are listed twice in {names}; list each once.")
    return list(names)


def loss(name):
    """The compiled loss of method ``name`` (on logits): a peer loss at its
    authors' settings, or None for the cross-entropy (and the margin's own
    choice)."""
    if name in PEER_LOSSES:
        cls, settings = PEER_LOSSES[name]
        return cls(**settings, from_logits=True)
    return None


def adversary(name, eps, steps=PGD_STEPS):
    """The training adversary of method ``name``: `attacks.PGD` at ``eps``
    for ``pgd-at``, else None."""
    return attacks.PGD(eps, steps=steps) if name == PGD_TRAINING else None
