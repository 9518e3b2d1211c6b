"""The large-margin penalty of Elsayed et al. (2018): its config and its math.

For an example with label ``y`` and scores ``f`` (softmax probabilities or
logits), each competitor ``j`` -- one of the ``top_k`` classes other than
``y`` with the largest ``f_j`` -- has the score difference
``diff_j = f_y - f_j``.  Its first-order distance to the decision boundary
between ``y`` and ``j``, measured at the activations ``h_l`` of a margin
layer in the norm ``p``, is

    d_lj = diff_j / (||d diff_j / d h_l||_q / w_l + epsilon)

where ``q`` is the dual norm of ``p``: a linear function with gradient ``g``
changes by ``||g||_q`` per unit step measured in ``p``.  The penalty of one
layer and one example is

    term_l = max(0, gamma_l - max(d_lj, gamma_l * (1 - alpha)))

summed over competitors (``aggregation="sum"``) or taken at the nearest one
(``aggregation="max"``, the worst case).

``d_lj`` is a distance (in the layer's units, times ``w_l``) only where
``f`` are logits; softmax differences saturate, so their ``d_lj`` measure
confidence as much as geometry. What is reported as a distance is always
the logits' (`boundary_distances`).
"""

import contextlib
import math
import numbers

import keras
import numpy as np
import tensorflow as tf

INPUT = "input"
"""Name under which `LargeMargin.layers` designates the model input."""

LABEL_ERROR_PREFIX = "Labels must be class indices"
"""Start of the message of the step's label check (see `class_indices`)."""

_DUAL_ORDER = {1: math.inf, 2: 2, math.inf: 1}
_AGGREGATIONS = ("max", "sum")
_SPACES = ("probabilities", "logits")
_COUPLINGS = ("batch", "inference")
_COMPETITORS = ("top", "sampled")


def _parse_norm(norm):
    if isinstance(norm, str) and norm.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        if norm in _DUAL_ORDER:
            return math.inf if math.isinf(norm) else int(norm)
    raise ValueError(
        f"Unsupported `norm={norm!r}`. The distance norm must be 1, 2 or "
        "infinity: pass `norm=1`, `norm=2` or `norm='inf'` (or `np.inf`)."
    )


def _per_layer(name, value, count, check):
    """Broadcasts a float or a list of floats to one float per margin layer."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(
            f"`{name}` has {len(values)} values but the margin has {count} "
            f"layers. Pass one float, or one float per layer in `layers`."
        )
    for item in values:
        if not isinstance(item, numbers.Real) or isinstance(item, bool):
            raise ValueError(f"`{name}` must hold floats; received {value!r}.")
        check(float(item))
    return tuple(float(item) for item in values)


def _require(condition, message):
    if not condition:
        raise ValueError(message)


@keras.saving.register_keras_serializable(package="marginfit")
class LargeMargin:
    """Configuration of the large-margin penalty (Elsayed et al. 2018).

    Args:
        layers: Names (or layer objects) of the layers whose outputs carry the
            margin; the name ``"input"`` designates the model input.
        gamma: The margin the hinge asks for, one float or one per layer,
            in the units of the quantity it is compared with: the layer
            weight times the first-order distance of the scores in
            ``space``. With ``space="logits"`` that is a distance in the
            layer's units (pixels at the input, in the norm ``norm``; exact
            for a linear model), so gamma can be a target distance, e.g. a
            known attack's eps. With ``space="probabilities"`` the estimate
            grows without bound as the softmax saturates (its gradient
            vanishes while the difference stays near 1), so gamma is no
            distance: the default 1e4 keeps the hinge on for every example.
        norm: Norm ``p`` of the distance: 1, 2 or ``"inf"``. Gradients are
            measured in the dual norm (2 -> 2, 1 -> inf, inf -> 1).
        top_k: Number of competing classes per example.
        competitors: Which classes compete: ``"sampled"`` (the default:
            ``top_k`` classes drawn uniformly from the others, anew for each
            example and training step, from the step count, so that a restored
            model draws what the uninterrupted one would; evaluation draws
            with a fixed seed) or
            ``"top"`` (the ``top_k`` highest-scoring classes other than the
            label, the authors' choice). Sampled competitors make the loss,
            in expectation, the mean over every competitor (with
            ``aggregation="sum"``: the sum, up to the factor ``top_k /
            (classes - 1)``) at the cost of ``top_k`` backward passes; it
            stays consistent under heavy label noise, where the top-scoring
            competitor's margin prefers a constant output (see the README).
        aggregation: ``"max"`` penalises the nearest of the ``top_k``
            boundaries; ``"sum"`` adds one term per competitor.
        alpha: Distances below ``gamma * (1 - alpha)`` are clipped, so that
            badly misclassified examples stop dominating the penalty.
        epsilon: Added to the gradient norm to avoid dividing by zero.
        approximate: If True, the gradient norm is treated as a constant
            (first-order approximation, no second-order backprop). If False,
            the loss is differentiated through the gradient norm too.
        layer_weights: Per-layer scale ``w_l`` dividing the gradient norm,
            or None for 1 everywhere (the authors use the layer size with the
            inf norm).
        space: Scores the loss's differences are taken in:
            ``"probabilities"`` (softmax of the logits, the authors' choice
            and the default) or ``"logits"`` (see ``gamma`` for the units of
            each). The distances the logs and `MarginModel.margin_distances`
            report are those of the logits in either case
            (`boundary_distances`).
        weight: Multiplier of the penalty in the total loss.
        balance: Weight of the class-balance term added to the penalty:
            ``KL(uniform || p_mean) = -mean_c log(p_mean_c) - log(classes)``,
            where ``p_mean`` is the batch mean of the predicted
            probabilities (see `balance_term`). It is 0 when the batch's
            predictions spread evenly over the classes, and grows as one class
            takes every example, the state the margin alone can drift into
            and stay in for epochs under heavy label noise (see the README).
            0 gives the authors' loss. It assumes classes of similar
            frequency; for strongly imbalanced classes, lower it or pass 0.
        coupling: How gradients are taken when layers couple the examples of
            a batch in training mode (BatchNormalization). ``"batch"`` (the
            authors' choice, one forward pass): gradients of the batch-summed
            differences through the training-mode pass; exact per example for
            any model whose examples do not interact, and through the batch
            statistics otherwise. ``"inference"``: the penalty is computed on
            a second, inference-mode forward pass where every gradient is that
            example's own.
    """

    def __init__(
        self,
        layers,
        gamma=10000.0,
        norm=2,
        top_k=1,
        competitors="sampled",
        aggregation="max",
        alpha=4.0,
        epsilon=1e-6,
        approximate=True,
        layer_weights=None,
        space="probabilities",
        weight=1.0,
        coupling="batch",
        balance=1.0,
    ):
        if isinstance(layers, (str, keras.layers.Layer)):
            layers = [layers]
        layers = list(layers or [])
        _require(
            layers,
            "`layers` is empty. Name at least one layer to carry the margin, "
            'e.g. `layers=["input", "dense"]`.',
        )
        names = []
        for layer in layers:
            name = layer.name if isinstance(layer, keras.layers.Layer) else layer
            _require(
                isinstance(name, str) and name,
                f"`layers` must hold layer names or layer objects; received {layer!r}.",
            )
            _require(
                name not in names,
                f"Layer {name!r} is listed twice in `layers`; list it once.",
            )
            names.append(name)
        self.layers = tuple(names)

        def positive_gamma(value):
            _require(
                value > 0 and math.isfinite(value),
                f"`gamma` must be a positive finite float; received {gamma!r}.",
            )

        def positive_weight(value):
            _require(
                value > 0 and math.isfinite(value),
                f"`layer_weights` must hold positive finite floats; received {layer_weights!r}.",
            )

        self.gamma = _per_layer("gamma", gamma, len(names), positive_gamma)
        self.layer_weights = (
            None
            if layer_weights is None
            else _per_layer("layer_weights", layer_weights, len(names), positive_weight)
        )
        self.norm = _parse_norm(norm)
        _require(
            isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 1,
            f"`top_k` must be an integer >= 1; received {top_k!r}.",
        )
        self.top_k = int(top_k)
        _require(
            competitors in _COMPETITORS,
            f"Unknown `competitors={competitors!r}`; use 'top' (highest-scoring "
            "classes) or 'sampled' (classes drawn at random).",
        )
        self.competitors = competitors
        _require(
            aggregation in _AGGREGATIONS,
            f"Unknown `aggregation={aggregation!r}`; use 'max' (nearest "
            "competitor) or 'sum' (one term per competitor).",
        )
        self.aggregation = aggregation
        _require(
            isinstance(alpha, numbers.Real) and alpha > 0,
            f"`alpha` must be a float > 0; received {alpha!r}.",
        )
        self.alpha = float(alpha)
        _require(
            isinstance(epsilon, numbers.Real) and epsilon >= 0,
            f"`epsilon` must be a float >= 0; received {epsilon!r}.",
        )
        self.epsilon = float(epsilon)
        self.approximate = bool(approximate)
        _require(
            space in _SPACES,
            f"Unknown `space={space!r}`; use 'probabilities' or 'logits'.",
        )
        self.space = space
        _require(
            isinstance(weight, numbers.Real) and weight >= 0,
            f"`weight` must be a float >= 0; received {weight!r}.",
        )
        self.weight = float(weight)
        _require(
            coupling in _COUPLINGS,
            f"Unknown `coupling={coupling!r}`; use 'batch' or 'inference'.",
        )
        self.coupling = coupling
        _require(
            isinstance(balance, numbers.Real)
            and not isinstance(balance, bool)
            and balance >= 0
            and math.isfinite(balance),
            f"`balance` must be a finite float >= 0 (0 turns the class-balance "
            f"term off); received {balance!r}.",
        )
        self.balance = float(balance)

    @property
    def dual_norm(self):
        """Order of the norm the gradients are measured in: 1, 2 or inf."""
        return _DUAL_ORDER[self.norm]

    def get_config(self):
        return {
            "layers": list(self.layers),
            "gamma": list(self.gamma),
            "norm": "inf" if math.isinf(self.norm) else self.norm,
            "top_k": self.top_k,
            "competitors": self.competitors,
            "aggregation": self.aggregation,
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "approximate": self.approximate,
            "layer_weights": (None if self.layer_weights is None else list(self.layer_weights)),
            "space": self.space,
            "weight": self.weight,
            "coupling": self.coupling,
            "balance": self.balance,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, LargeMargin) and (self.get_config() == other.get_config())

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"LargeMargin({arguments})"


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
        message=f"{LABEL_ERROR_PREFIX} >= 0, but a batch holds a negative label. Check the labels.",
    )
    tf.debugging.assert_less(
        indices,
        num_classes,
        message=f"{LABEL_ERROR_PREFIX} < {num_classes} (the number of model "
        "outputs), but a batch holds a larger one. Check the labels or the size "
        "of the output layer.",
    )
    return indices


def score_differences(outputs, labels, top_k, space, output_kind, draws=None):
    """Score of the label minus the scores of its ``top_k`` competitors.

    Args:
        outputs: ``[batch, classes]`` model outputs: logits or probabilities,
            as ``output_kind`` says.
        labels: ``[batch]`` int32 class indices.
        top_k: Number of competitors per example.
        space: ``"probabilities"`` or ``"logits"``: where differences are taken.
        output_kind: ``"logits"`` or ``"probabilities"``: what ``outputs`` are.
        draws: None for the ``top_k`` highest-scoring competitors; else
            ``[batch, classes]`` random keys in [0, 1) (e.g. uniform): the
            ``top_k`` classes other than the label with the largest keys are
            the competitors (uniform keys: drawn without replacement).

    Returns:
        ``[batch, top_k]`` float32 differences ``f_y - f_j``; highest-scoring
        competitors first, or in the order of their keys.
    """
    outputs = tf.cast(outputs, tf.float32)
    if space == output_kind:
        scores = outputs
    elif space == "probabilities":
        scores = tf.nn.softmax(outputs, axis=-1)
    else:
        # log p differs from the logits by a per-example constant, which
        # cancels in every difference.
        scores = tf.math.log(tf.maximum(outputs, np.finfo("float32").tiny))
    num_classes = scores.shape[-1]
    is_label = tf.one_hot(labels, num_classes, on_value=True, off_value=False)
    label_scores = tf.reduce_sum(tf.where(is_label, scores, 0.0), axis=-1)
    keys = scores if draws is None else tf.cast(draws, tf.float32)
    keys = tf.where(is_label, tf.float32.min, keys)
    competitors = tf.math.top_k(keys, k=top_k, sorted=True).indices
    competitor_scores = tf.gather(scores, competitors, batch_dims=1)
    return label_scores[:, None] - competitor_scores


def dual_norm(gradients, order):
    """Per-example norm of ``[batch, ...]`` gradients, in float32.

    Returns ``[batch]``. The 2-norm is written so that its own gradient is 0,
    not NaN, at a zero vector (needed when differentiating through it).
    """
    flat = tf.reshape(tf.cast(gradients, tf.float32), [tf.shape(gradients)[0], -1])
    if order == 1:
        return tf.reduce_sum(tf.abs(flat), axis=-1)
    if math.isinf(order):
        return tf.reduce_max(tf.abs(flat), axis=-1)
    squared = tf.reduce_sum(tf.square(flat), axis=-1)
    positive = squared > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, squared, 1.0)), 0.0)


def hinge_terms(distances, gamma, alpha, aggregation):
    """Penalty per example from ``[batch, top_k]`` distances of one layer.

    Returns ``[batch]``: ``max(0, gamma - max(d, gamma * (1 - alpha)))``
    at the nearest competitor (``"max"``) or summed over competitors
    (``"sum"``).
    """
    if aggregation == "max":
        distances = tf.reduce_min(distances, axis=-1, keepdims=True)
    clipped = tf.maximum(distances, gamma * (1.0 - alpha))
    return tf.reduce_sum(tf.nn.relu(gamma - clipped), axis=-1)


def margin_loss(distances, margin, sample_weight=None):
    """The margin loss of a batch, and each example's nearest distances.

    Per example, the hinge terms of every margin layer (`hinge_terms`) are
    averaged over the layers and weighted by ``sample_weight``; the loss is
    their batch mean (Keras' ``sum(w * t) / batch``).

    Args:
        distances: One ``[batch, competitors]`` float32 tensor of signed
            distances per margin layer, in the order of ``margin.layers``
            (from `layer_distances`).
        margin: The `LargeMargin` config.
        sample_weight: Optional ``[batch]`` (or ``[batch, 1]``) weights.

    Returns:
        ``(loss, nearest)``: the float32 scalar loss, and one ``[batch]``
        tensor per layer of the distance to the nearest competitor's boundary.
    """
    terms = [
        hinge_terms(layer_distances, gamma, margin.alpha, margin.aggregation)
        for layer_distances, gamma in zip(distances, margin.gamma)
    ]
    per_example = tf.add_n(terms) / len(terms)
    if sample_weight is not None:
        per_example *= tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
    nearest = [tf.reduce_min(layer_distances, axis=-1) for layer_distances in distances]
    return tf.reduce_mean(per_example), nearest


def balance_term(outputs, output_kind, sample_weight=None):
    """How far a batch's mean prediction is from uniform.

    Args:
        outputs: ``[batch, classes]`` logits or probabilities, as
            ``output_kind`` (``"logits"`` or ``"probabilities"``) says.
        sample_weight: Optional ``[batch]`` (or ``[batch, 1]``) weights of
            the mean.

    Returns:
        Float32 scalar ``KL(uniform || p_mean) = -mean_c log(p_mean_c) -
        log(classes)`` >= 0, where ``p_mean`` is the (weighted) batch mean of
        the predicted probabilities.
    """
    return balance_from_sums(balance_sums(outputs, output_kind, sample_weight))


def balance_sums(outputs, output_kind, sample_weight=None):
    """What `balance_term` needs of a batch, as sums over its examples (which
    add up over the parts of a batch split between replicas).

    Returns:
        ``[classes + 1]`` float32: the (weighted) sum of the predicted
        probabilities per class, then the sum of the weights (the number of
        examples without ``sample_weight``).
    """
    outputs = tf.cast(outputs, tf.float32)
    probabilities = tf.nn.softmax(outputs, axis=-1) if output_kind == "logits" else outputs
    if sample_weight is None:
        weights = tf.ones_like(probabilities[:, :1])
    else:
        weights = tf.reshape(tf.cast(sample_weight, tf.float32), [-1, 1])
    weighted = tf.reduce_sum(weights * probabilities, axis=0)
    return tf.concat([weighted, tf.reshape(tf.reduce_sum(weights), [1])], axis=0)


def balance_from_sums(sums):
    """`balance_term` from `balance_sums` (of a batch, or added up over the
    replicas' parts of it); float32 scalar."""
    classes = sums.shape[0] - 1
    mean = tf.math.divide_no_nan(sums[:classes], sums[classes])
    tiny = np.finfo("float32").tiny
    return -tf.reduce_mean(tf.math.log(tf.maximum(mean, tiny))) - math.log(classes)


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
        distances = [_distance(differences, n, w, margin) for n, w in zip(norms, _weights(margin))]
        return distances, _dead(differences, norms)
    # Exact, "max": only the nearest competitor's distance reaches the loss.
    # Find it with unrecorded passes, then record (and later differentiate
    # through) one backward pass per layer, seeded with each example's
    # nearest competitor and reaching only that layer.
    norms = _gradient_norms(tape, differences, activations, margin, outer_tape, False)
    distances = []
    for activation, layer_norms, weight, name in zip(
        activations, norms, _weights(margin), margin.layers
    ):
        estimate = _distance(differences, tf.stop_gradient(layer_norms), weight, margin)
        nearest = tf.one_hot(tf.argmin(estimate, axis=-1), margin.top_k)
        (gradient,) = _gradients(tape, differences, [activation], nearest, [name])
        norm = dual_norm(gradient, margin.dual_norm)
        difference = tf.reduce_sum(differences * nearest, axis=-1, keepdims=True)
        distances.append(_distance(difference, norm[:, None], weight, margin))
    return distances, _dead(differences, norms)


def _dead(differences, norms):
    """``[batch]``: a competitor not beaten whose gradient is exactly zero
    at some layer."""
    stuck = [(layer_norms == 0) & (differences <= 0) for layer_norms in norms]
    return tf.reduce_any(tf.stack(stuck, axis=-1), axis=[1, 2])


def _weights(margin):
    return margin.layer_weights or (1.0,) * len(margin.layers)


def _distance(differences, norms, weight, margin):
    if margin.approximate:
        norms = tf.stop_gradient(norms)
    return differences / (norms / weight + margin.epsilon)


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
                layer_norms.append(dual_norm(gradient, margin.dual_norm))
        return [tf.stack(layer_norms, axis=-1) for layer_norms in norms]


LOGGED_COMPETITORS = 1
"""Competitors of the ``distance_<layer>`` logs (`boundary_distances`): the
highest-scoring one, one backward pass per evaluation batch."""

NEAREST_COMPETITORS = 9
"""Competitors `MarginModel.margin_distances` searches by default: the 9
highest-scoring, as DeepFool implementations limit their candidate classes
to the 10 most likely (the label among them)."""


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
                difference / (dual_norm(gradient, margin.dual_norm) + margin.epsilon),
            )
            for layer_nearest, gradient in zip(nearest, gradients)
        ]

    start = [tf.fill(batch, np.inf) for _ in activations]
    _, nearest = tf.while_loop(lambda k, _: k < competitors, nearer, [0, start])
    return nearest
