"""Distances to the decision boundary from the scores' gradients, in
`keras.ops`, for every backend.

A backend gives one primitive, a `Gradients` of the forward pass
(`marginfit.backend`): the gradients of the score differences with respect
to the margin layers' activations, for a chosen competitor per example.
Everything else -- which competitors, which norm, the approximate or exact
distance, the dead examples -- is here, written once.
"""

import contextlib

import numpy as np
from keras import ops

from marginfit import margin as margin_lib


class Gradients:
    """The gradients of one recorded forward pass (the backend primitive).

    A backend subclasses it; `__call__` differentiates one of the recorded
    score differences (``"loss"``: the loss's, in its space; ``"logits"``:
    the logits', for the reported distances).
    """

    def __call__(self, name, selector, targets=None):
        """Gradients of ``sum(differences[name] * selector)``.

        Args:
            name: ``"loss"`` or ``"logits"``.
            selector: ``[batch, k]`` float32 weights of the competitors
                (one-hot rows pick one competitor per example).
            targets: Indices of the margin layers to differentiate with
                respect to; None for all.

        Returns:
            One ``[batch, ...]`` gradient per target layer.
        """
        raise NotImplementedError

    def unrecorded(self):
        """A context in which backward passes are not differentiated
        through (where the backend records them at all)."""
        return contextlib.nullcontext()


def unconnected_message(name):
    """The error where the output does not depend on margin layer ``name``
    in the recorded forward pass."""
    return (
        f"The model output does not depend on margin layer {name!r} in the recorded "
        "forward pass. Put the margin on a layer between the inputs and the output "
        "(with integer inputs, after a trainable layer: nothing before it is recorded)."
    )


def layer_distances(gradients, differences, margin):
    """The loss's distances to the boundary at every margin layer.

    All margin layers share one backward pass per competitor: the gradient of
    the batch sum of ``differences[:, j]`` with respect to a ``[batch, ...]``
    activation holds each example's own gradient in its row, for models
    whose examples do not interact.

    Args:
        gradients: The `Gradients` of the forward pass.
        differences: ``[batch, top_k]`` from `margin.score_differences`,
            recorded as ``"loss"``.
        margin: The `LargeMargin` config.

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
        with contextlib.nullcontext() if not margin.approximate else gradients.unrecorded():
            norms = _gradient_norms(gradients, differences, margin)
        weights = margin.per_layer_weights
        distances = [_distance(differences, n, w, margin) for n, w in zip(norms, weights)]
        return distances, _dead(differences, norms)
    # Exact, "max": only the nearest competitor's distance reaches the loss.
    # Find it with unrecorded passes, then record (and later differentiate
    # through) one backward pass per layer, seeded with each example's
    # nearest competitor and reaching only that layer.
    with gradients.unrecorded():
        norms = _gradient_norms(gradients, differences, margin)
    distances = []
    for layer, (layer_norms, weight) in enumerate(zip(norms, margin.per_layer_weights)):
        estimate = _distance(differences, ops.stop_gradient(layer_norms), weight, margin)
        nearest = ops.one_hot(ops.argmin(estimate, axis=-1), margin.top_k)
        (gradient,) = gradients("loss", nearest, [layer])
        norm = margin_lib.dual_norm(gradient, margin.dual_norm)
        difference = ops.sum(differences * nearest, axis=-1, keepdims=True)
        distances.append(_distance(difference, ops.expand_dims(norm, -1), weight, margin))
    return distances, _dead(differences, norms)


def _dead(differences, norms):
    """``[batch]``: a competitor not beaten whose gradient is exactly zero
    at some layer."""
    stuck = [ops.logical_and(layer_norms == 0, differences <= 0) for layer_norms in norms]
    return ops.any(ops.stack(stuck, axis=-1), axis=[1, 2])


def _distance(differences, norms, weight, margin):
    if margin.approximate:
        norms = ops.stop_gradient(norms)
    return margin_lib.distance(differences, norms, weight, margin.epsilon)


def _selector(differences, competitor):
    """``[batch, k]`` one-hot rows picking ``competitor`` for every example."""
    batch = ops.shape(differences)[:1]
    return ops.one_hot(ops.full(batch, competitor, dtype="int32"), differences.shape[-1])


def _gradient_norms(gradients, differences, margin):
    """``[batch, top_k]`` dual norms of each competitor's gradient, per layer."""
    norms = [[] for _ in margin.layers]
    for competitor in range(margin.top_k):
        selected = gradients("loss", _selector(differences, competitor))
        for layer_norms, gradient in zip(norms, selected):
            layer_norms.append(margin_lib.dual_norm(gradient, margin.dual_norm))
    return [ops.stack(layer_norms, axis=-1) for layer_norms in norms]


def boundary_distances(gradients, differences, margin):
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
        gradients: The `Gradients` of the forward pass.
        differences: ``[batch, k]`` logit differences ``z_y - z_j`` of the
            competitors to search, recorded as ``"logits"``.
        margin: The `LargeMargin` config (its layers, norm and epsilon).

    Returns:
        One ``[batch]`` float32 tensor of signed distances per layer
        (negative where the example is misclassified).
    """

    def nearer(competitor, nearest):
        selector = _selector(differences, competitor)
        difference = ops.sum(differences * selector, axis=-1)
        return [
            ops.minimum(
                layer_nearest,
                margin_lib.distance(
                    difference,
                    margin_lib.dual_norm(gradient, margin.dual_norm),
                    1.0,
                    margin.epsilon,
                ),
            )
            for layer_nearest, gradient in zip(nearest, gradients("logits", selector))
        ]

    start = [ops.full(ops.shape(differences)[:1], np.inf) for _ in margin.layers]
    return ops.fori_loop(0, differences.shape[-1], nearer, start)
