"""Input perturbations for robustness evaluation: FGSM and PGD (L-inf).

Both maximise the cross-entropy of the model's output for the true labels
within an L-inf ball of radius ``eps`` around each input, clipped to the
valid input range. Gradients come from `tf.GradientTape`; every example is
attacked independently, in batches.
"""

import keras
import numpy as np
import tensorflow as tf


def _check(eps, clip):
    if not eps >= 0:
        raise ValueError(f"`eps` must be >= 0 (an L-inf radius); received {eps!r}.")
    if clip is not None and not clip[0] < clip[1]:
        raise ValueError(f"`clip` must be (low, high) with low < high; received {clip!r}.")


def _from_logits(model):
    """Whether the model emits logits (`MarginModel` says; else assumed)."""
    return getattr(model, "output_kind", "logits") == "logits"


def _loss_gradient(model, x, y):
    """``[batch, ...]`` gradient of each example's cross-entropy w.r.t. ``x``."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = tf.cast(model(x, training=False), tf.float32)
        loss = keras.losses.sparse_categorical_crossentropy(
            y, outputs, from_logits=_from_logits(model)
        )
    return tape.gradient(loss, x)


def _project(x_adv, x, eps, clip):
    x_adv = tf.clip_by_value(x_adv, x - eps, x + eps)
    return x_adv if clip is None else tf.clip_by_value(x_adv, *clip)


def fgsm(model, x, y, eps, clip=(0.0, 1.0)):
    """Fast gradient sign method: ``x + eps * sign(grad_x loss)``, clipped.

    Args:
        model: A Keras classifier (logits, or probabilities for a
            `MarginModel` with ``output="probabilities"``).
        x: ``[batch, ...]`` float inputs.
        y: ``[batch]`` integer labels.
        eps: L-inf radius, in input units.
        clip: ``(low, high)`` valid input range, or None.

    Returns:
        ``[batch, ...]`` float32 perturbed inputs.
    """
    _check(eps, clip)
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y)
    gradient = _loss_gradient(model, x, y)
    return _project(x + eps * tf.sign(gradient), x, eps, clip)


def pgd(model, x, y, eps, steps=10, step_size=None, random_start=True, clip=(0.0, 1.0), seed=0):
    """Projected gradient descent (Madry et al. 2018), L-inf.

    ``steps`` signed-gradient steps of ``step_size`` (default
    ``2.5 * eps / steps``), each projected back onto the ``eps`` ball and the
    ``clip`` range, from a uniform random start in the ball.

    Returns:
        ``[batch, ...]`` float32 perturbed inputs.
    """
    _check(eps, clip)
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1; received {steps!r}.")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y)
    x_adv = x
    if random_start:
        noise = tf.random.stateless_uniform(tf.shape(x), [seed, 0], -eps, eps)
        x_adv = _project(x + noise, x, eps, clip)
    for _ in range(steps):
        gradient = _loss_gradient(model, x_adv, y)
        x_adv = _project(x_adv + step_size * tf.sign(gradient), x, eps, clip)
    return x_adv


def adversarial_accuracy(model, x, y, eps, attack="fgsm", batch_size=256, **options):
    """Accuracy of ``model`` on ``attack``-perturbed ``x`` (``"fgsm"`` or
    ``"pgd"``), attacked in batches of ``batch_size``."""
    attacks = {"fgsm": fgsm, "pgd": pgd}
    if attack not in attacks:
        raise ValueError(f"Unknown attack {attack!r}; use one of {sorted(attacks)}.")
    correct = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        perturbed = attacks[attack](model, xb, yb, eps, **options)
        predictions = np.argmax(model.predict_on_batch(perturbed), axis=-1)
        correct += int(np.sum(predictions == np.asarray(yb)))
    return correct / len(x)
