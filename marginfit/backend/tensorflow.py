"""The TensorFlow backend of the margin: the gradients of the score
differences with respect to the margin layers, from the `tf.GradientTape`
that recorded the forward pass, and the label checks inside the step.

Every function here is the TensorFlow form of a primitive that each backend
provides (`marginfit.backend`); the math around them, in `keras.ops`, is in
`marginfit.margin`.
"""

import contextlib

import numpy as np
import tensorflow as tf

from marginfit import margin as margin_lib


def class_indices(labels, num_classes):
    """Class index per example from sparse or one-hot labels.

    Args:
        labels: ``[batch]`` or ``[batch, 1]`` class indices, or
            ``[batch, num_classes]`` one-hot (or soft) labels.
        num_classes: Number of classes ``C`` of the model output.

    Returns:
        ``[batch]`` int32 class indices.
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2 and labels.shape[-1] == num_classes and (num_classes > 1):
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    indices = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    # XLA drops assertions; outside XLA a bad label stops the step here.
    tf.debugging.assert_non_negative(
        indices,
        message=f"{margin_lib.LABEL_ERROR_PREFIX} >= 0, but a batch holds a negative "
        "label. Check the labels.",
    )
    tf.debugging.assert_less(
        indices,
        num_classes,
        message=f"{margin_lib.LABEL_ERROR_PREFIX} < {num_classes} (the number of model "
        "outputs), but a batch holds a larger one. Check the labels or the size "
        "of the output layer.",
    )
    return indices


def layer_distances(tape, differences, activations, margin, outer_tape=None):
    """Distances to the boundary at every margin layer.

    All margin layers share one backward pass per competitor: the gradient of
    the batch sum of ``differences[:, j]`` with respect to a ``[batch, ...]``
    activation holds each example's own gradient in its row, for models
    whose examples do not interact.

    Args:
        tape: The `tf.GradientTape` that recorded the forward pass; it must be
            persistent when ``top_k > 1``.
        differences: ``[batch, top_k]`` from `score_differences`.
        activations: One ``[batch, ...]`` tensor per margin layer, in the
            order of ``margin.layers``.
        margin: The `LargeMargin` config.
        outer_tape: The tape computing the weights' gradients, if any. It
            records only the backward passes it must differentiate through.

    Returns:
        ``(distances, dead)``: one float32 tensor of signed distances per
        layer, ``[batch, top_k]``, or ``[batch, 1]`` (the nearest
        competitor's) for an exact, ``"max"`` aggregated margin with
        ``top_k > 1``; and a ``[batch]`` bool tensor, True for the examples
        that no gradient can move: on the wrong side of (or on) a boundary
        whose difference has a zero gradient at some margin layer (dead
        ReLUs, saturated outputs). Their distances are ``difference /
        epsilon``, not geometry.
    """
    if margin.approximate or margin.top_k == 1 or margin.aggregation == "sum":
        # Every competitor's distance enters the loss (or the gradient norm
        # is a constant): one backward pass per competitor.
        record = not margin.approximate
        norms = _gradient_norms(tape, differences, activations, margin, outer_tape, record)
        weights = margin.per_layer_weights
        distances = [_distance(differences, n, w, margin) for n, w in zip(norms, weights)]
        return distances, _dead(differences, norms)
    # Exact, "max": only the nearest competitor's distance reaches the loss.
    # Find it with unrecorded passes, then record (and later differentiate
    # through) one backward pass per layer, seeded with each example's
    # nearest competitor and reaching only that layer.
    norms = _gradient_norms(tape, differences, activations, margin, outer_tape, False)
    distances = []
    for activation, layer_norms, weight, name in zip(
        activations, norms, margin.per_layer_weights, margin.layers
    ):
        estimate = _distance(differences, tf.stop_gradient(layer_norms), weight, margin)
        nearest = tf.one_hot(tf.argmin(estimate, axis=-1), margin.top_k)
        (gradient,) = _gradients(tape, differences, [activation], nearest, [name])
        norm = margin_lib.dual_norm(gradient, margin.dual_norm)
        difference = tf.reduce_sum(differences * nearest, axis=-1, keepdims=True)
        distances.append(_distance(difference, norm[:, None], weight, margin))
    return distances, _dead(differences, norms)


def _dead(differences, norms):
    """``[batch]``: a competitor not beaten whose gradient is exactly zero
    at some layer."""
    stuck = [(layer_norms == 0) & (differences <= 0) for layer_norms in norms]
    return tf.reduce_any(tf.stack(stuck, axis=-1), axis=[1, 2])


def _distance(differences, norms, weight, margin):
    if margin.approximate:
        norms = tf.stop_gradient(norms)
    return margin_lib.distance(differences, norms, weight, margin.epsilon)


def _gradients(tape, differences, activations, selector, names):
    """Gradients of ``sum(differences * selector)`` w.r.t. ``activations``.

    Seeding the backward pass with ``selector`` picks competitors without
    slicing (a slice taken outside the tape would not be recorded)."""
    gradients = tape.gradient(differences, activations, output_gradients=selector)
    for name, gradient in zip(names, gradients):
        if gradient is None:
            raise ValueError(
                f"The model output does not depend on margin layer {name!r} in "
                "the recorded forward pass. Put the margin on a layer between "
                "the inputs and the output (with integer inputs, after a "
                "trainable layer: the tape records nothing before it)."
            )
    return gradients


def _gradient_norms(tape, differences, activations, margin, outer_tape, record):
    """``[batch, top_k]`` dual norms of each competitor's gradient, per layer.

    The outer tape records these passes only if ``record``."""
    skip_recording = outer_tape is not None and not record
    with outer_tape.stop_recording() if skip_recording else contextlib.nullcontext():
        norms = [[] for _ in activations]
        batch = tf.shape(differences)[:1]
        for competitor in range(margin.top_k):
            selector = tf.one_hot(tf.fill(batch, competitor), margin.top_k)
            gradients = _gradients(tape, differences, activations, selector, margin.layers)
            for layer_norms, gradient in zip(norms, gradients):
                layer_norms.append(margin_lib.dual_norm(gradient, margin.dual_norm))
        return [tf.stack(layer_norms, axis=-1) for layer_norms in norms]


def boundary_distances(tape, differences, activations, margin):
    """Each example's first-order distance to the nearest decision boundary
    at every margin layer, in the units of the layer's activations (pixels
    at the input), whatever space the loss is taken in.

    The distance to the boundary between the label ``y`` and a competitor
    ``j`` is that of the logits' linearisation, ``(z_y - z_j) / ||grad_h
    (z_y - z_j)||_q`` in the dual norm ``q``; the nearest of the given
    competitors gives the result (with every other class: DeepFool's first
    step, exact for a linear model). No layer weights apply: the loss
    compares ``layer_weights[l]`` times this with ``gamma``.

    Args:
        tape: The persistent `tf.GradientTape` that recorded the forward pass.
        differences: ``[batch, k]`` logit differences ``z_y - z_j`` of the
            competitors to search (`score_differences` in logit space).
        activations: One ``[batch, ...]`` tensor per margin layer.
        margin: The `LargeMargin` config (its layers, norm and epsilon).

    Returns:
        One ``[batch]`` float32 tensor of signed distances per layer
        (negative where the example is misclassified).
    """
    competitors = differences.shape[-1]
    batch = tf.shape(differences)[:1]

    def nearer(competitor, nearest):
        selector = tf.one_hot(tf.fill(batch, competitor), competitors)
        gradients = _gradients(tape, differences, activations, selector, margin.layers)
        difference = tf.reduce_sum(differences * selector, axis=-1)
        return competitor + 1, [
            tf.minimum(
                layer_nearest,
                margin_lib.distance(
                    difference,
                    margin_lib.dual_norm(gradient, margin.dual_norm),
                    1.0,
                    margin.epsilon,
                ),
            )
            for layer_nearest, gradient in zip(nearest, gradients)
        ]

    start = [tf.fill(batch, np.inf) for _ in activations]
    _, nearest = tf.while_loop(lambda k, _: k < competitors, nearer, [0, start])
    return nearest
