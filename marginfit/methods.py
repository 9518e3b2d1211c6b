"""The training methods that `marginfit compare` and the benchmarks set side
by side: cross-entropy, the losses robust to label noise at their authors'
published settings, the margin, and three adversarial trainings (PGD, fast
FGSM from a random start, TRADES).

Every method trains the same network with the same optimizers, weight
average, validation split, seed and epochs; only the loss (and, for the
adversarial trainings, the training batches or a penalty) differs. The peers' settings
are the authors' for handwritten digits (MNIST), where they published some,
and never tuned on our data:

- ``gce``: `losses.GeneralizedCrossEntropy`, q = 0.7 (Zhang & Sabuncu 2018;
  Active-Passive-Losses, Ma et al. 2020, ``configs/mnist/sym/gce.yaml``).
- ``sce``: `losses.SymmetricCrossEntropy`, alpha = 0.01, beta = 1 (Wang et
  al. 2019, MNIST; ``configs/mnist/sym/sce.yaml``).
- ``nce-rce``: `losses.NCEAndRCE`, alpha = 1, beta = 10
  (``configs/mnist/sym/nce+rce.yaml``).
- ``ce-eps-mae``: `losses.EpsilonSoftmaxCEAndMAE`, m = 1e5, alpha = 0.01,
  beta = 5 (eps-softmax ``config.py``, CIFAR-10 with symmetric noise: its
  MNIST configuration has no CEeps+MAE).
- ``anl-ce``: `losses.ActiveNegativeLoss`, alpha = 1, beta = 1, with the
  L1 term delta = 1e-6 on every weight as the network's regularizer (Ye et
  al. 2023; Active-Negative-Loss ``config/mnist_anl_ce.json``).
- ``ldr-kl``: `losses.LDRKL`, c = 0.1, lambda = 10 (Zhu et al.; the
  eps-softmax reference code's MNIST setting, ``config.py``).
- ``pgd-at``: the cross-entropy on PGD examples, 40 steps of 2.5 eps / 40
  from a random start (Madry et al. 2018; ``mnist_challenge``: 40 steps,
  random start, steps of eps / 30; 2.5 eps / steps is their ``robustness``
  library's rule), at the eps it is evaluated at.
- ``fgsm-at``: the cross-entropy on FGSM examples from a uniform random
  start, step 1.25 eps (Wong et al. 2020, `attacks.fgsm_random_start`),
  at the eps it is evaluated at.
- ``trades``: the cross-entropy plus beta = 1 times `TRADES`' KL term, its
  inner maximisation 40 steps of eps / 30 (``train_trades_mnist.py``: eps
  0.3, 40 steps of 0.01, beta 1), at the eps it is evaluated at.

Each peer's optimizer, schedule and epochs are the ones every method here
shares, not its authors'.
"""

from marginfit import attacks, losses
from marginfit.trades import TRADES

CROSS_ENTROPY = "cross-entropy"
MARGIN = "margin"
PGD_TRAINING = "pgd-at"
FGSM_TRAINING = "fgsm-at"
TRADES_TRAINING = "trades"

PEER_LOSSES = {
    "gce": (losses.GeneralizedCrossEntropy, {"q": 0.7}),
    "sce": (losses.SymmetricCrossEntropy, {"alpha": 0.01, "beta": 1.0}),
    "nce-rce": (losses.NCEAndRCE, {"alpha": 1.0, "beta": 10.0}),
    "ce-eps-mae": (losses.EpsilonSoftmaxCEAndMAE, {"m": 1e5, "alpha": 0.01, "beta": 5.0}),
    "anl-ce": (losses.ActiveNegativeLoss, {"alpha": 1.0, "beta": 1.0}),
    "ldr-kl": (losses.LDRKL, {"margin": 0.1, "temperature": 10.0}),
}
"""Method name -> (loss class, the authors' settings); see the module table."""

WEIGHT_L1 = {"anl-ce": 1e-6}
"""Method name -> weight of an L1 term on every kernel and bias that the
method's authors add to its loss."""

ADVERSARIAL = (PGD_TRAINING, FGSM_TRAINING, TRADES_TRAINING)
"""The methods that train against an attack, at an eps."""

NAMES = (CROSS_ENTROPY, *PEER_LOSSES, MARGIN, *ADVERSARIAL)
"""Every method, in the order the reports list them."""

PGD_STEPS = TRADES_STEPS = 40
"""Steps of the training attack of ``pgd-at`` and of the inner
maximisation of ``trades`` (both authors' MNIST setting)."""
TRADES_BETA = 1.0
"""``beta`` of ``trades`` (the authors' MNIST setting)."""


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
    """The training adversary of method ``name`` at ``eps``: `attacks.PGD`
    of ``steps`` steps for ``pgd-at``, `attacks.fgsm_random_start` for
    ``fgsm-at``, else None."""
    if name == PGD_TRAINING:
        return attacks.PGD(eps, steps=steps)
    if name == FGSM_TRAINING:
        return attacks.fgsm_random_start(eps)
    return None


def penalty(name, eps, steps=TRADES_STEPS):
    """The penalty of method ``name`` other than the margin: `TRADES` at
    ``eps`` with ``steps`` steps of its inner maximisation for ``trades``,
    else None."""
    if name == TRADES_TRAINING:
        return TRADES(eps, weight=TRADES_BETA, steps=steps)
    return None
