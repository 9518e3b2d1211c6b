"""Losses with complete, reloadable configs: a Huber loss, and the losses
robust to label noise that the margin is measured against (GCE on Keras'
own `keras.losses.CategoricalGeneralizedCrossEntropy`)."""

import math

import keras
import numpy as np
from keras import ops

from marginfit.labels import is_one_hot


@keras.saving.register_keras_serializable(package="marginfit")
class HuberLoss(keras.losses.Huber):
    """Huber loss that keeps its threshold through saving.

    Per element of the error ``e = y_true - y_pred``: ``e**2 / 2`` where
    ``|e| <= threshold``, else ``threshold * |e| - threshold**2 / 2``; then the
    mean over the last axis. Keras' `Huber` computes the same, but its
    `get_config` omits ``delta``, so a saved model reloads it with the default
    threshold of 1.

    Args:
        threshold: Positive float, where the loss turns from quadratic to
            linear (in the units of the targets).
        reduction: As for `keras.losses.Loss`.
        name: As for `keras.losses.Loss`.
        dtype: As for `keras.losses.Loss`.
    """

    def __init__(
        self, threshold=1.0, reduction="sum_over_batch_size", name="huber_loss", dtype=None
    ):
        if not threshold > 0:
            raise ValueError(f"`threshold` must be positive; received {threshold!r}.")
        super().__init__(delta=threshold, reduction=reduction, name=name, dtype=dtype)
        self.threshold = float(threshold)

    def get_config(self):
        config = {**super().get_config(), "threshold": self.threshold}
        config.pop("delta", None)  # Keras 3.16's Huber saves it; the threshold is it
        return config


# ------------------------------------------------- losses robust to label noise
# Written from the papers and checked against the authors' reference code
# (the clipping constants are theirs). Labels are class indices ([batch] or
# [batch, 1]) or one-hot rows ([batch, classes]); predictions are logits
# (``from_logits=True``) or probabilities.

_PROBABILITY_FLOOR = 1e-7
"""Where the reference code of GCE, SCE and RCE clips probabilities."""
_RCE_LOG_ZERO = -math.log(1e-4)
"""``-log 0`` in the reverse cross-entropy: the reference code clips the
one-hot label to 1e-4 before taking its log (the SCE paper writes A = -4)."""


def _label_probabilities(y_true, y_pred, from_logits):
    """``(p_y, p, log_p, one_hot)``: the probability of each example's label
    ``[batch]``; the probabilities, their logs and the one-hot labels
    ``[batch, classes]``; float32."""
    y_pred = ops.cast(y_pred, "float32")
    classes = y_pred.shape[-1]
    if from_logits:
        log_p = ops.log_softmax(y_pred, axis=-1)
        p = ops.exp(log_p)
    else:
        p = y_pred
        log_p = ops.log(ops.maximum(p, np.finfo("float32").tiny))
    y_true = ops.convert_to_tensor(y_true)
    if is_one_hot(y_true.shape, classes):
        labels = ops.argmax(y_true, axis=-1)
    else:
        labels = ops.reshape(y_true, [-1])
    one_hot = ops.one_hot(ops.cast(labels, "int32"), classes)
    return ops.sum(one_hot * p, axis=-1), p, log_p, one_hot


def _reverse_cross_entropy(p, one_hot):
    """``-sum_k p_k log q_k`` with the one-hot label ``q`` clipped to 1e-4 and
    ``p`` to 1e-7 (the reference code): ``-log(1e-4)`` times the clipped
    probability mass off the label. ``[batch]``."""
    clipped = ops.maximum(p, _PROBABILITY_FLOOR)
    return _RCE_LOG_ZERO * ops.sum((1.0 - one_hot) * clipped, axis=-1)


def _normalized_cross_entropy(log_p, one_hot):
    """``log p_y / sum_k log p_k`` (Ma et al. 2020), in [0, 1]. ``[batch]``."""
    return ops.sum(one_hot * log_p, axis=-1) / ops.sum(log_p, axis=-1)


class _RobustLoss(keras.losses.Loss):
    """A per-example loss of the label's probability; subclasses give
    `per_example` and their hyperparameters."""

    def __init__(self, from_logits, reduction, name, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        return self.per_example(*_label_probabilities(y_true, y_pred, self.from_logits))

    def per_example(self, p_y, p, log_p, one_hot):
        """``[batch]`` losses from the label's probability ``p_y``
        (``[batch]``), the probabilities ``p`` and their logs ``log_p``
        (``[batch, classes]``) and the ``one_hot`` labels."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


def _non_negative(name, value):
    if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a float >= 0; received {value!r}.")
    return float(value)


@keras.saving.register_keras_serializable(package="marginfit")
class GeneralizedCrossEntropy(keras.losses.CategoricalGeneralizedCrossEntropy):
    """Generalized cross-entropy (Zhang & Sabuncu 2018, arXiv 1805.07836):
    Keras' `CategoricalGeneralizedCrossEntropy`, ``(1 - p_y**q) / q`` per
    example with ``p_y`` the predicted probability of the label, taking
    logits (``from_logits``) and one-hot labels as well.

    Keras' loss takes probabilities and class indices only, and raises
    ``p_y`` to ``q`` as it is; this one floors ``p_y`` at 1e-7 first, as the
    authors' reference code does, which keeps the gradient finite where a
    saturated softmax gives ``p_y = 0``. ``q -> 0`` gives the cross-entropy,
    ``q -> 1`` the mean absolute error.

    Args:
        q: In (0, 1); 0.7, the authors' setting for MNIST and CIFAR.
        from_logits: Whether ``y_pred`` are logits (else probabilities).
        reduction: As for `keras.losses.Loss`.
        name: As for `keras.losses.Loss`.
        dtype: As for `keras.losses.Loss`.

    Example:
        ``model.compile("adam", marginfit.losses.GeneralizedCrossEntropy(from_logits=True))``
    """

    def __init__(
        self,
        q=0.7,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="generalized_cross_entropy",
        dtype=None,
    ):
        if not (isinstance(q, (int, float)) and 0 < q < 1):
            raise ValueError(f"`q` must be a float in (0, 1); received {q!r}.")
        super().__init__(q=float(q), reduction=reduction, name=name, dtype=dtype)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        p_y, p, _, one_hot = _label_probabilities(y_true, y_pred, self.from_logits)
        labels = ops.argmax(one_hot, axis=-1)
        return super().call(labels, ops.maximum(p, _PROBABILITY_FLOOR))

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="marginfit")
class SymmetricCrossEntropy(_RobustLoss):
    """Symmetric cross-entropy (Wang et al. 2019, arXiv 1908.06112).

    Per example: ``alpha * CE + beta * RCE``, where ``CE = -log p_y`` and the
    reverse cross-entropy ``RCE = -sum_k p_k log q_k`` takes the one-hot label
    ``q`` clipped to 1e-4 (so ``RCE = 9.21 * (1 - p_y)`` up to clipping, as in
    the reference code).

    Args:
        alpha: Weight of the cross-entropy; the authors use 0.01 on MNIST,
            0.1 on CIFAR-10.
        beta: Weight of the reverse cross-entropy; 1.0 on both.
        from_logits: Whether ``y_pred`` are logits (else probabilities).
        reduction: As for `keras.losses.Loss`.
        name: As for `keras.losses.Loss`.
        dtype: As for `keras.losses.Loss`.
    """

    def __init__(
        self,
        alpha=0.1,
        beta=1.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="symmetric_cross_entropy",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.alpha = _non_negative("alpha", alpha)
        self.beta = _non_negative("beta", beta)

    def per_example(self, p_y, p, log_p, one_hot):
        cross_entropy = -ops.sum(one_hot * log_p, axis=-1)
        return self.alpha * cross_entropy + self.beta * _reverse_cross_entropy(p, one_hot)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


class _NormalizedCEPlus(_RobustLoss):
    """``alpha * NCE + beta * second``, the normalized cross-entropy beside a
    second term of the subclass (`second`); the subclass names the loss
    (`default_name`)."""

    default_name = None

    def __init__(
        self,
        alpha=1.0,
        beta=1.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name=None,
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name or self.default_name, dtype)
        self.alpha = _non_negative("alpha", alpha)
        self.beta = _non_negative("beta", beta)

    def per_example(self, p_y, p, log_p, one_hot):
        active = _normalized_cross_entropy(log_p, one_hot)
        return self.alpha * active + self.beta * self.second(p, one_hot)

    def second(self, p, one_hot):
        """``[batch]`` second term from the probabilities and one-hot labels."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="marginfit")
class NCEAndRCE(_NormalizedCEPlus):
    """Normalized cross-entropy plus reverse cross-entropy, the active-passive
    loss of Ma et al. 2020 (arXiv 2006.13554).

    Per example: ``alpha * NCE + beta * RCE``, where ``NCE = log p_y /
    sum_k log p_k`` (the cross-entropy normalized over every label, in
    [0, 1]) and ``RCE`` is `SymmetricCrossEntropy`'s reverse cross-entropy.

    Args:
        alpha: Weight of the active term (NCE); the authors use 1.0 on MNIST
            and CIFAR-10.
        beta: Weight of the passive term (RCE); 10.0 on MNIST, 1.0 on
            CIFAR-10.
        from_logits: Whether ``y_pred`` are logits (else probabilities).
        reduction: As for `keras.losses.Loss`.
        name: As for `keras.losses.Loss`.
        dtype: As for `keras.losses.Loss`.
    """

    default_name = "nce_and_rce"

    def second(self, p, one_hot):
        return _reverse_cross_entropy(p, one_hot)


@keras.saving.register_keras_serializable(package="marginfit")
class EpsilonSoftmaxCEAndMAE(_RobustLoss):
    """Cross-entropy on the epsilon-softmax plus mean absolute error, CEε+MAE
    (Wang et al., NeurIPS 2024, arXiv 2508.02387).

    The epsilon-softmax moves the predicted distribution towards the one-hot
    vector of its top class: ``p_eps = (p + m * onehot(argmax p)) / (1 + m)``
    (the reference code's form, ``m`` the paper's 1/epsilon); then, per
    example, ``alpha * -log(max(p_eps_y, 1e-8)) + beta * 2 * (1 - p_y)``.

    Args:
        m: Weight of the top class, >= 0 (0 gives CE + MAE); the authors use
            1e5 on CIFAR-10 with symmetric noise.
        alpha: Weight of the epsilon-softmax cross-entropy; 0.01 there.
        beta: Weight of the MAE; 5.0 there.
        from_logits: Whether ``y_pred`` are logits (else probabilities).
        reduction: As for `keras.losses.Loss`.
        name: As for `keras.losses.Loss`.
        dtype: As for `keras.losses.Loss`.
    """

    def __init__(
        self,
        m=1e5,
        alpha=0.01,
        beta=5.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="epsilon_softmax_ce_and_mae",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.m = _non_negative("m", m)
        self.alpha = _non_negative("alpha", alpha)
        self.beta = _non_negative("beta", beta)

    def per_example(self, p_y, p, log_p, one_hot):
        top = ops.one_hot(ops.argmax(p, axis=-1), p.shape[-1])
        p_eps = (p + self.m * top) / (1.0 + self.m)
        label_p_eps = ops.sum(one_hot * p_eps, axis=-1)
        cross_entropy = -ops.log(ops.maximum(label_p_eps, 1e-8))
        return self.alpha * cross_entropy + self.beta * 2.0 * (1.0 - p_y)

    def get_config(self):
        return {**super().get_config(), "m": self.m, "alpha": self.alpha, "beta": self.beta}


_ANL_PROBABILITY_FLOOR = 1e-7
"""Where the ANL reference code clips probabilities before their log."""


@keras.saving.register_keras_serializable(package="marginfit")
class ActiveNegativeLoss(_NormalizedCEPlus):
    """Active Negative Loss with the cross-entropy, ANL-CE (Ye et al.,
    NeurIPS 2023; journal version arXiv 2412.02373): normalized
    cross-entropy plus normalized negative cross-entropy.

    Per example: ``alpha * NCE + beta * NNCE``, where ``NCE = log p_y /
    sum_k log p_k`` and, with ``p`` clipped to ``[1e-7, 1]`` and ``A = -log
    1e-7``, ``NNCE = 1 - (A + log p_y) / sum_k (A + log p_k)``. The
    authors' third term, ``delta * sum |w|`` over every weight, is not a
    function of the predictions: give it to the network as an L1
    regularizer (`marginfit.methods` does, with their ``delta``).

    Args:
        alpha: Weight of the active term (NCE); the authors use 1.0 on MNIST.
        beta: Weight of the negative term (NNCE); 1.0 on MNIST.
        from_logits: Whether ``y_pred`` are logits (else probabilities).
        reduction: As for `keras.losses.Loss`.
        name: As for `keras.losses.Loss`.
        dtype: As for `keras.losses.Loss`.
    """

    default_name = "active_negative_loss"

    def second(self, p, one_hot):
        shifted = -math.log(_ANL_PROBABILITY_FLOOR) + ops.log(
            ops.maximum(p, _ANL_PROBABILITY_FLOOR)
        )
        return 1.0 - ops.sum(one_hot * shifted, axis=-1) / ops.sum(shifted, axis=-1)


@keras.saving.register_keras_serializable(package="marginfit")
class LDRKL(_RobustLoss):
    """The label-distributionally robust loss with a KL regularizer, LDR-KL
    (Zhu, Ying & Yang, arXiv 2112.14869), in the form of its reference code
    (the eps-softmax repository's ``LDRLoss_V1``).

    The logits are made positive and scale-free, ``s = softplus(z) /
    mean_k softplus(z_k)``; then, per example, ``lam * log(mean_k exp((c *
    [k != y] + s_k - s_y) / lam))``: a soft maximum over the classes of the
    margin-augmented score gaps, whose temperature ``lam`` spreads the
    weight over the classes (``lam -> 0``: the largest gap, a hinge loss;
    large ``lam``: their mean). Takes logits only.

    Args:
        margin: ``c``, the margin added to every other class's gap; 0.1,
            the reference code's setting.
        temperature: ``lam`` > 0; 10, the reference code's MNIST and
            CIFAR-10 setting.
        from_logits: Must be True: the loss is defined on logits.
        reduction: As for `keras.losses.Loss`.
        name: As for `keras.losses.Loss`.
        dtype: As for `keras.losses.Loss`.
    """

    def __init__(
        self,
        margin=0.1,
        temperature=10.0,
        from_logits=True,
        reduction="sum_over_batch_size",
        name="ldr_kl",
        dtype=None,
    ):
        if not from_logits:
            raise ValueError(
                "LDRKL is defined on logits: compile a model that emits logits with "
                "LDRKL(from_logits=True)."
            )
        super().__init__(from_logits, reduction, name, dtype)
        self.margin = _non_negative("margin", margin)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"`temperature` must be a float > 0; received {temperature!r}.")
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        _, _, _, one_hot = _label_probabilities(y_true, logits, True)
        scores = ops.softplus(logits)
        scores = scores / ops.mean(scores, axis=-1, keepdims=True)
        label = ops.sum(one_hot * scores, axis=-1, keepdims=True)
        gaps = (self.margin * (1.0 - one_hot) + scores - label) / self.temperature
        return self.temperature * _log_mean_exp(gaps)

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "temperature": self.temperature,
        }


def _log_mean_exp(values):
    """``log(mean(exp(values)))`` over the last axis, ``[batch]``: as
    ``log1p(mean(expm1(values)))`` where every value is small (the result
    lies near 0 there, and the log-sum-exp form loses it to cancellation),
    else from the largest value."""
    largest = ops.max(values, axis=-1)
    small = ops.log1p(ops.mean(ops.expm1(ops.minimum(values, 1.0)), axis=-1))
    shifted = largest + ops.log(ops.mean(ops.exp(values - largest[:, None]), axis=-1))
    return ops.where(largest <= 1.0, small, shifted)
