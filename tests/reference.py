"""A naive large-margin loss: one example and one competitor at a time.

Written from the paper's definition, independently of `marginfit`: every
gradient comes from its own `tf.GradientTape` on a batch of one, competitors
are chosen with numpy, and norms use `tf.norm`. Slow on purpose.
"""

import numpy as np
import tensorflow as tf

DUAL = {1: np.inf, 2: 2, np.inf: 1}


def competitors(scores, label, top_k):
    """Indices of the ``top_k`` highest-scoring classes other than ``label``."""
    order = [j for j in np.argsort(-scores, kind="stable") if j != label]
    return order[:top_k]


def _scores(outputs, space, output_kind):
    if space == output_kind:
        return outputs
    if space == "probabilities":
        return tf.nn.softmax(outputs)
    return tf.math.log(outputs)


def example_distances(
    tap_model,
    x,
    label,
    *,
    layers,
    norm=2,
    top_k=1,
    space="probabilities",
    output_kind="logits",
    epsilon=1e-6,
    layer_weights=None,
    approximate=True,
    training=False,
):
    """Distances of one example to its ``top_k`` nearest boundaries.

    Args:
        tap_model: Maps a batch to ``[outputs, *hidden activations]`` in the
            order of ``layers`` without ``"input"``.
        x: One example, with a leading batch axis of 1.

    Returns:
        ``[num_layers][top_k]`` list of scalar tensors (differentiable with
        respect to the weights under an enclosing tape).
    """
    x = tf.convert_to_tensor(x)
    outputs = tap_model(x, training=training)[0]
    scores = _scores(outputs, space, output_kind)[0].numpy()
    rivals = competitors(scores, int(label), top_k)
    weights = layer_weights or [1.0] * len(layers)
    distances = [[] for _ in layers]
    for rival in rivals:
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs, *hidden = tap_model(x, training=training)
            scores = _scores(outputs, space, output_kind)[0]
            difference = scores[int(label)] - scores[rival]
        hidden = iter(hidden)
        sources = [x if name == "input" else next(hidden) for name in layers]
        gradients = tape.gradient(difference, sources)
        for per_layer, gradient, weight in zip(distances, gradients, weights):
            gradient_norm = tf.norm(tf.reshape(gradient, [-1]), ord=DUAL[norm])
            if approximate:
                gradient_norm = tf.stop_gradient(gradient_norm)
            per_layer.append(difference / (gradient_norm / weight + epsilon))
    return distances


def margin_loss(
    tap_model,
    x,
    y,
    *,
    gamma,
    alpha=4.0,
    aggregation="max",
    sample_weight=None,
    **distance_options,
):
    """Naive margin loss of a batch, and each example's nearest distance.

    Returns:
        ``(loss, nearest)``: the scalar loss (a tensor, differentiable with
        respect to the weights under an enclosing tape) and a
        ``[num_layers, batch]`` numpy array of the smallest distance over the
        competitors.
    """
    layers = distance_options["layers"]
    gammas = gamma if isinstance(gamma, (list, tuple)) else [gamma] * len(layers)
    total = 0.0
    nearest = np.zeros((len(layers), len(x)))
    for k in range(len(x)):
        distances = example_distances(tap_model, x[k : k + 1], y[k], **distance_options)
        example_total = 0.0
        for layer, (per_layer, g) in enumerate(zip(distances, gammas)):
            nearest[layer, k] = min(float(d) for d in per_layer)
            if aggregation == "max":
                per_layer = [tf.reduce_min(tf.stack(per_layer))]
            for d in per_layer:
                # The authors' term, the hinge minus gamma, in float64 (gamma
                # may be 1e4 and the term near 0).
                d = tf.cast(d, "float64")
                example_total += tf.nn.relu(g - tf.maximum(d, g * (1 - alpha))) - g
        weight = 1.0 if sample_weight is None else float(sample_weight[k])
        total += weight * example_total / len(layers)
    return tf.cast(total / len(x), "float32"), nearest


def batch_coupled_distances(tap_model, x, y, *, layers, norm=2, top_k=1, epsilon=1e-6):
    """The authors' batch-coupled estimate, and each example's own gradient.

    Scores are softmax probabilities of a training-mode forward pass over
    the whole batch. Returns ``(coupled, own)``, two ``[num_layers][top_k]``
    lists of ``[batch]`` distance arrays: ``coupled`` from the gradient of the
    batch sum of the differences, ``own`` from the diagonal blocks of the full
    Jacobian (what each example's difference owes to its own activations,
    with the batch statistics depending on it too).
    """
    x = tf.convert_to_tensor(x)
    scores = tf.nn.softmax(tap_model(x, training=True)[0]).numpy()
    rivals = np.array([competitors(s, int(label), top_k) for s, label in zip(scores, y)])
    coupled = [[] for _ in layers]
    own = [[] for _ in layers]
    batch = np.arange(len(x))
    for j in range(top_k):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            outputs, *hidden = tap_model(x, training=True)
            probabilities = tf.nn.softmax(outputs)
            difference = tf.gather(probabilities, y, axis=1, batch_dims=1) - tf.gather(
                probabilities, rivals[:, j], axis=1, batch_dims=1
            )
        hidden = iter(hidden)
        sources = [x if name == "input" else next(hidden) for name in layers]
        for layer, source in enumerate(sources):
            summed = tape.gradient(difference, source).numpy().reshape(len(x), -1)
            jacobian = tape.jacobian(difference, source).numpy()
            diagonal = jacobian.reshape(len(x), len(x), -1)[batch, batch]
            for target, gradient in ((coupled, summed), (own, diagonal)):
                gradient_norm = np.linalg.norm(gradient, ord=DUAL[norm], axis=-1)
                target[layer].append(difference.numpy() / (gradient_norm + epsilon))
    return coupled, own


def boundary_distances(
    tap_model, x, y, *, layers, norm=2, competitors=9, output_kind="logits", epsilon=1e-6
):
    """What marginfit calls a distance: per layer and example, the smallest
    logit-space first-order distance ``(z_y - z_j) / ||grad (z_y - z_j)||``
    over the ``competitors`` highest-scoring competitors (the logs: 1), without
    layer weights.

    Returns ``[num_layers, batch]`` numpy.
    """
    classes = tap_model(tf.convert_to_tensor(x[:1]))[0].shape[-1]
    nearest = np.zeros((len(layers), len(x)))
    for k in range(len(x)):
        distances = example_distances(
            tap_model,
            x[k : k + 1],
            y[k],
            layers=layers,
            norm=norm,
            top_k=min(classes - 1, competitors),
            space="logits",
            output_kind=output_kind,
            epsilon=epsilon,
        )
        for layer, per_layer in enumerate(distances):
            nearest[layer, k] = min(float(d) for d in per_layer)
    return nearest


def balance_reference(logits, weights):
    """KL(uniform || weighted batch-mean softmax) and its gradient with
    respect to the logits, in float64 numpy: the gradient of
    ``-(1/C) sum_c log m_c`` with ``m_c = sum_i w_i p_ic / W`` is
    ``-(w_i / (C W)) sum_c (p_ic / m_c) (delta_ck - p_ik)``."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    total = weights.sum()
    m = (weights[:, None] * p).sum(axis=0) / total
    classes = p.shape[1]
    value = -np.mean(np.log(m)) - np.log(classes)
    ratio = p / m  # [batch, classes]: p_ic / m_c
    inner = ratio - p * ratio.sum(axis=1, keepdims=True)  # sum_c (p_ic/m_c)(delta_ck - p_ik)
    gradient = -(weights[:, None] / (classes * total)) * inner
    return value, gradient
