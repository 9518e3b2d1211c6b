"""Distances to the decision boundary, in `keras.ops`, for every backend.

For an example with label ``y`` and scores ``f``, the first-order distance
of the boundary between ``y`` and a competitor ``j``, measured at the
activations ``h`` of a layer in the norm ``p``, is

    d_j = (f_y - f_j) / (||d (f_y - f_j) / d h||_q / w + epsilon)

where ``q`` is the dual norm of ``p`` (a linear function with gradient
``g`` changes by ``||g||_q`` per unit step measured in ``p``) and ``w`` a
layer weight. The gradients come from the backend's `Recording` of the
forward pass (`marginfit.penalty`): one backward pass per competitor, for
all layers at once. `layer_distances` gives the margin loss's;
`boundary_distances` gives what the logs and `MarginModel.margin_distances`
report (`margin_distances`, through `nearest_boundaries`): the logits'
distance to the nearest boundary, in the layer's units.
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops

from marginfit import _keras_internals, backend, checks

_TINY = float(np.finfo("float32").tiny)
_LOWEST = float(np.finfo("float32").min)

LOGGED_COMPETITORS = 1
"""Competitors of the ``distance_<layer>`` logs: the highest-scoring one,
one backward pass per evaluation batch."""

NEAREST_COMPETITORS = 9
"""Competitors `MarginModel.margin_distances` searches by default: the 9
highest-scoring, as DeepFool implementations limit their candidate classes
to the 10 most likely (the label among them)."""


def score_differences(outputs, labels, top_k, space, output_kind, draws=None):
    """Score of the label minus the scores of its ``top_k`` competitors.

    Args:
        outputs: ``[batch, classes]`` model outputs: logits or probabilities,
            as ``output_kind`` says.
        labels: ``[batch]`` int class indices.
        top_k: Number of competitors per example.
        space: ``"probabilities"`` or ``"logits"``: where differences are taken.
        output_kind: ``"logits"`` or ``"probabilities"``: what ``outputs`` are.
        draws: None for the ``top_k`` highest-scoring competitors; else
            ``[batch, classes]`` random keys in [0, 1): the ``top_k`` classes
            other than the label with the largest keys are the competitors
            (uniform keys: drawn without replacement).

    Returns:
        ``[batch, top_k]`` float32 differences ``f_y - f_j``; highest-scoring
        competitors first, or in the order of their keys.
    """
    outputs = ops.cast(outputs, keras.backend.floatx())
    if space == output_kind:
        scores = outputs
    elif space == "probabilities":
        scores = ops.softmax(outputs, axis=-1)
    else:
        # log p differs from the logits by a per-example constant, which
        # cancels in every difference.
        scores = ops.log(ops.maximum(outputs, _TINY))
    is_label = ops.equal(ops.arange(scores.shape[-1])[None, :], ops.expand_dims(labels, -1))
    label_scores = ops.sum(ops.where(is_label, scores, 0.0), axis=-1)
    keys = scores if draws is None else ops.cast(draws, "float32")
    keys = ops.where(is_label, _LOWEST, keys)
    _, competitors = ops.top_k(keys, k=top_k, sorted=True)
    competitor_scores = ops.take_along_axis(scores, competitors, axis=-1)
    return ops.expand_dims(label_scores, -1) - competitor_scores


def dual_norm(gradients, order):
    """Per-example norm of ``[batch, ...]`` gradients, in float32.

    Returns ``[batch]``. The 2-norm is written so that its own gradient is 0,
    not NaN, at a zero vector (needed when differentiating through it).
    """
    flat = ops.reshape(ops.cast(gradients, keras.backend.floatx()), (ops.shape(gradients)[0], -1))
    if order == 1:
        return ops.sum(ops.abs(flat), axis=-1)
    if math.isinf(order):
        return ops.max(ops.abs(flat), axis=-1)
    squared = ops.sum(ops.square(flat), axis=-1)
    positive = squared > 0
    return ops.where(positive, ops.sqrt(ops.where(positive, squared, 1.0)), 0.0)


def distance(differences, norms, weight, epsilon):
    """The first-order distance ``differences / (norms / weight + epsilon)``
    (elementwise; ``norms`` the gradients' dual norms)."""
    return differences / (norms / weight + epsilon)


def _selector(differences, competitor):
    """``[batch, k]`` one-hot rows picking ``competitor`` for every example."""
    batch = ops.shape(differences)[:1]
    return ops.one_hot(ops.full(batch, competitor, dtype="int32"), differences.shape[-1])


def _gradient_norms(recording, differences, margin):
    """``[batch, top_k]`` dual norms of each competitor's gradient, per layer."""
    norms = [[] for _ in margin.layers]
    for competitor in range(margin.top_k):
        selected = recording.gradients("loss", _selector(differences, competitor), margin.layers)
        for layer_norms, gradient in zip(norms, selected):
            layer_norms.append(dual_norm(gradient, margin.dual_norm))
    return [ops.stack(layer_norms, axis=-1) for layer_norms in norms]


def _distance(differences, norms, weight, margin):
    if margin.approximate:
        norms = ops.stop_gradient(norms)
    return distance(differences, norms, weight, margin.epsilon)


def _dead(differences, norms):
    """``[batch]``: a competitor not beaten whose gradient is exactly zero
    at some layer."""
    stuck = [ops.logical_and(layer_norms == 0, differences <= 0) for layer_norms in norms]
    return ops.any(ops.stack(stuck, axis=-1), axis=[1, 2])


def layer_distances(recording, differences, margin):
    """The margin loss's distances to the boundary at every margin layer.

    All margin layers share one backward pass per competitor: the gradient of
    the batch sum of ``differences[:, j]`` with respect to a ``[batch, ...]``
    activation holds each example's own gradient in its row, for models
    whose examples do not interact.

    Args:
        recording: The `Recording` of the forward pass, which recorded
            ``differences`` as ``"loss"`` and hooked each margin layer.
        differences: ``[batch, top_k]`` from `score_differences`.
        margin: The `LargeMargin`.

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
        with recording.unrecorded() if margin.approximate else contextlib.nullcontext():
            norms = _gradient_norms(recording, differences, margin)
        weights = margin.per_layer_weights
        distances = [_distance(differences, n, w, margin) for n, w in zip(norms, weights)]
        return distances, _dead(differences, norms)
    # Exact, "max": only the nearest competitor's distance reaches the loss.
    # Find it with unrecorded passes, then record (and later differentiate
    # through) one backward pass per layer, seeded with each example's
    # nearest competitor and reaching only that layer.
    with recording.unrecorded():
        norms = _gradient_norms(recording, differences, margin)
    distances = []
    for layer, layer_norms, weight in zip(margin.layers, norms, margin.per_layer_weights):
        estimate = _distance(differences, ops.stop_gradient(layer_norms), weight, margin)
        nearest = ops.one_hot(ops.argmin(estimate, axis=-1), margin.top_k)
        (gradient,) = recording.gradients("loss", nearest, [layer])
        norm = dual_norm(gradient, margin.dual_norm)
        difference = ops.sum(differences * nearest, axis=-1, keepdims=True)
        distances.append(_distance(difference, ops.expand_dims(norm, -1), weight, margin))
    return distances, _dead(differences, norms)


def boundary_distances(recording, differences, layers, order, epsilon):
    """Each example's first-order distance to the nearest of the recorded
    competitors' boundaries at every layer of ``layers``: the logits'
    linearisation ``(z_y - z_j) / ||grad_h (z_y - z_j)||_q`` (with every
    other class: DeepFool's first step, exact for a linear model).

    Args:
        recording: The `Recording` of a forward pass that recorded
            ``differences`` as ``"logits"`` and hooked each layer.
        differences: ``[batch, k]`` logit differences ``z_y - z_j``.
        layers: Names of the layers.
        order: The dual norm ``q``: 1, 2 or inf.
        epsilon: Added to the gradient norm.

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
                distance(difference, dual_norm(gradient, order), 1.0, epsilon),
            )
            for layer_nearest, gradient in zip(
                nearest, recording.gradients("logits", selector, layers)
            )
        ]

    start = [ops.full(ops.shape(differences)[:1], np.inf) for _ in layers]
    return ops.fori_loop(0, differences.shape[-1], nearer, start)


def logit_differences(outputs, labels, competitors, output_kind):
    """``[batch, k]`` logit differences ``z_y - z_j`` to the ``competitors``
    highest-scoring classes other than the label (capped at the number of
    other classes): what a reported distance is taken of."""
    count = min(competitors, outputs.shape[-1] - 1)
    return score_differences(outputs, labels, count, "logits", output_kind)


def nearest_boundaries(model, x, y, margin, gradients, competitors=LOGGED_COMPETITORS):
    """Each example's distance to the nearest decision boundary at every
    margin layer, in the layer's units (pixels at the input) and the
    margin's norm, in inference mode, whatever space the loss is taken in:
    `boundary_distances` of `logit_differences` on a recorded pass of its
    own (`MarginModel.margin_distances`; the ``distance_<layer>`` logs take
    the same of the evaluation step's pass).

    Args:
        model: The `MarginModel`.
        x: A batch of inputs.
        y: Its labels (class indices or one-hot rows).
        margin: The `LargeMargin` (its layers, norm and epsilon).
        gradients: The backend's `GradientPrimitive`.
        competitors: The number of highest-scoring classes other than the
            label whose boundaries are searched: one backward pass each.

    Returns:
        One ``[batch]`` float32 tensor per margin layer (no layer weights
        apply: the loss compares ``layer_weights[l]`` times these with
        ``gamma``).
    """

    def forward(x, hook):
        outputs, _ = model.call_with_activations(x, training=False, hook=hook)
        outputs = model.penalty_head(outputs)
        labels = backend.class_indices(y, outputs.shape[-1])
        differences = logit_differences(outputs, labels, competitors, model.output_kind)
        return {"logits": differences}, differences

    differences, recording = gradients.record(forward, x)
    return boundary_distances(
        recording, differences, margin.layers, margin.dual_norm, margin.epsilon
    )


def margin_distances(model, x, y=None, batch_size=256, competitors=NEAREST_COMPETITORS):
    """Each example's signed distance to the nearest decision boundary at
    every margin layer of ``model``, in the units of the layer (pixels at
    the input) and the margin's norm, in inference mode: the first-order
    distance of the logits, ``(z_y - z_j) / ||grad (z_y - z_j)||``, to the
    nearest of the ``competitors`` highest-scoring other classes ``j``
    (`nearest_boundaries`), whatever space the loss is taken in. With every
    other class (the default, for up to 10 classes) it is exact for a
    linear model; `marginfit.attacks.minimal_perturbation` measures the
    real distance at the input. The ``distance_<layer>`` logs are the mean
    of these with ``competitors=1`` (one backward pass per batch).

    Args:
        model: A `MarginModel` with a `LargeMargin`.
        x: The inputs, in any form `fit()` takes: an ``[n, ...]`` array, a
            list or dict of arrays for a model with several inputs, or a
            `tf.data.Dataset` (or `keras.utils.PyDataset`, or generator)
            of ``(x, y)`` batches, with ``y`` left None.
        y: ``[n]`` labels (or one-hot ``[n, classes]``) for array inputs.
        batch_size: Examples per batch, for array inputs.
        competitors: Number of highest-scoring classes, other than the
            label, whose boundaries are searched (one backward pass each);
            capped at the number of other classes.

    Returns:
        ``{layer name: [n] float32 numpy array}``.
    """
    margin = model.margin
    if margin is None:
        raise ValueError(
            "This MarginModel has no margin; give it a `margin` (or wrap "
            "the model with `MarginModel.wrap(model, margin=...)`)."
        )
    if not (
        isinstance(competitors, int) and not isinstance(competitors, bool) and competitors >= 1
    ):
        raise ValueError(f"`competitors` must be an integer >= 1; received {competitors!r}.")
    checks.check_data(model, x, y, name="margin_distances()")
    traced = model._untracked.traced
    if competitors not in traced:

        def nearest(xb, yb):
            primitive = backend.gradient_primitive(model)
            return nearest_boundaries(model, xb, yb, margin, primitive, competitors)

        traced[competitors] = backend.traced(model, nearest)
    parts = []
    for batch in _keras_internals.batches(x, y, batch_size):
        xb, yb, _ = keras.utils.unpack_x_y_sample_weight(batch)
        if yb is None:
            raise ValueError(
                "margin_distances() needs labels: pass `y` with array inputs, "
                "or a dataset of (x, y) batches."
            )
        parts.append(traced[competitors](xb, yb))
    return {
        name: np.concatenate([np.asarray(part[k]) for part in parts])
        for k, name in enumerate(margin.layers)
    }
