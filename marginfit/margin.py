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

    term_l = max(0, gamma_l - max(d_lj, gamma_l * (1 - alpha))) - gamma_l

summed over competitors (``aggregation="sum"``) or taken at the nearest one
(``aggregation="max"``, the worst case). The hinge minus ``gamma_l``, as the
authors write it, is minus the distance clipped to ``[gamma_l * (1 - alpha),
gamma_l]``: the loss falls from 0 towards ``-gamma`` as the margin grows.

``d_lj`` is a distance (in the layer's units, times ``w_l``) only where
``f`` are logits; softmax differences saturate, so their ``d_lj`` measure
confidence as much as geometry. What is reported as a distance is always
the logits' (`marginfit.distances.boundary_distances`).

`LargeMargin` is a `marginfit.Penalty`: the step calls it once; it runs
the forward pass under the backend's gradient primitive and returns the
loss, the outputs and what its metrics need.
"""

import functools
import math
import numbers

import keras
from keras import ops

from marginfit import backend, draws
from marginfit import distances as distances_lib
from marginfit import metrics as metrics_lib
from marginfit.activations import INPUT  # noqa: F401 (the name of the input)
from marginfit.penalty import Penalty, PenaltyResult

_DUAL_ORDER = {1: math.inf, 2: 2, math.inf: 1}
_AGGREGATIONS = ("max", "sum")
_SPACES = ("probabilities", "logits")
_COUPLINGS = ("batch", "inference")
_COMPETITORS = ("top", "sampled")
_TINY = distances_lib._TINY


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
class LargeMargin(Penalty):
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
            (`marginfit.distances.boundary_distances`).
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
        super().__init__(weight)
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
    def per_layer_weights(self):
        """One float per margin layer: ``layer_weights``, or 1 everywhere."""
        return self.layer_weights or (1.0,) * len(self.layers)

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

    # ------------------------------------------------------------ the penalty

    name = "margin"
    quiet_metrics = ("dead_rate",)

    def __call__(self, step):
        """The margin loss of ``step`` (a `marginfit.penalty.Step`): the
        hinge terms (`margin_loss`) plus ``balance`` times the class-balance
        term of the global batch; in evaluation, also the distances to the
        nearest boundary that the logs report (`distances.boundary_distances`
        of the same recorded pass)."""
        if not (step.training and self.coupling == "inference"):
            return super().__call__(step)
        # The inference pass runs first, so that it sees the moving
        # statistics as they were before this step's training pass.
        _, (differences, _), recording = self.recorded_pass(step, training=False)
        distances, dead = distances_lib.layer_distances(recording, differences["loss"], self)
        outputs = step.model(step.x, training=True)
        balance, head = None, step.model.penalty_head(outputs)
        if self.balance:
            sums = balance_sums(head, step.model.output_kind, step.sample_weight)
            balance = balance_from_sums(backend.global_batch(ops.shape(head)[0], sums).sums)
        return self._result(step, outputs, distances, dead, balance, None)

    def shares_pass(self, step):
        return not (step.training and self.coupling == "inference")

    def forward(self, step, outputs):
        """Inside the recorded pass: the score differences to differentiate
        (``"loss"``; in evaluation also ``"logits"``, for the logged
        distances) and the global batch's class-balance sums."""
        model, sampled = step.model, self.competitors == "sampled"
        self._check_top_k(model, outputs.shape[-1])
        labels = step.class_indices(outputs.shape[-1])
        batch_size = ops.shape(outputs)[0]
        # One all-reduce (with several replicas) for the balance term's
        # sums and the examples' positions in the global batch.
        batch = backend.global_batch(
            batch_size,
            sums=(
                balance_sums(outputs, model.output_kind, step.sample_weight)
                if self.balance
                else None
            ),
            positions=sampled,
        )
        keys = None
        if sampled:
            keys = draws.competitor_keys(step.number, batch.offset, batch_size, outputs.shape[-1])
        differentiable = {
            "loss": distances_lib.score_differences(
                outputs, labels, self.top_k, self.space, model.output_kind, keys
            )
        }
        if not step.training:
            differentiable["logits"] = distances_lib.logit_differences(
                outputs, labels, distances_lib.LOGGED_COMPETITORS, model.output_kind
            )
        return differentiable, (differentiable, batch.sums)

    def finish(self, step, outputs, aux, recording):
        differences, sums = aux
        distances, dead = distances_lib.layer_distances(recording, differences["loss"], self)
        balance = balance_from_sums(sums) if self.balance else None
        nearest = None
        if "logits" in differences:
            nearest = distances_lib.boundary_distances(
                recording, differences["logits"], self.layers, self.dual_norm, self.epsilon
            )
        return self._result(step, outputs, distances, dead, balance, nearest)

    def _result(self, step, outputs, distances, dead, balance, nearest):
        """The `PenaltyResult` from `distances.layer_distances`' ``distances``
        and ``dead``, the balance term (or None) and, in evaluation, the
        distances to the nearest boundary (or None)."""
        value = margin_loss(distances, self, step.sample_weight)
        if balance is not None:
            value += self.balance * balance
        logged = {"dead_rate": (ops.cast(dead, keras.backend.floatx()),)}
        if nearest is not None:
            for layer, layer_distances in zip(self.layers, nearest):
                logged[metrics_lib.distance_metric_name(layer)] = (layer_distances,)
            if self.space == "logits":
                logged["violation_rate"] = (ops.stack(nearest, axis=-1), step.sample_weight)
        return PenaltyResult(outputs, self.weight * value, value, logged)

    def _check_top_k(self, model, classes):
        if self.top_k > classes - 1:
            raise ValueError(
                f"`top_k={self.top_k}` exceeds the {classes - 1} competitors of a "
                f"{classes}-class output. Use top_k <= {classes - 1}."
            )

    def check_model(self, model):
        self._check_top_k(model, model.outputs[model.penalty_head.index].shape[-1])

    def make_metrics(self):
        """``dead_rate`` in training and evaluation; one ``distance_<layer>``
        per margin layer and, where gamma is a distance (``space="logits"``),
        ``violation_rate``, in evaluation only (see `marginfit.metrics`)."""
        names = ["dead_rate", *map(metrics_lib.distance_metric_name, self.layers)]
        metrics = [keras.metrics.Mean(name=name) for name in names]
        if self.space == "logits":
            thresholds = [g / w for g, w in zip(self.gamma, self.per_layer_weights)]
            metrics.append(metrics_lib.ViolationRate(thresholds))
        return metrics, tuple(metric.name for metric in metrics[1:])


def hinge_terms(distances, gamma, alpha, aggregation):
    """Penalty per example from ``[batch, top_k]`` distances of one layer.

    Returns ``[batch]``: ``max(0, gamma - max(d, gamma * (1 - alpha))) -
    gamma``, which is ``-min(gamma, max(d, gamma * (1 - alpha)))``, minus
    the distance clipped to ``[gamma * (1 - alpha), gamma]``, at the nearest
    competitor (``"max"``) or summed over competitors (``"sum"``). The
    offset ``- gamma`` is the authors' (it changes no gradient): the loss
    reads as minus a distance, 0 where examples sit on the boundary and
    ``-gamma`` once every one is ``gamma`` away.
    """
    if aggregation == "max":
        distances = ops.min(distances, axis=-1, keepdims=True)
    clipped = ops.maximum(distances, gamma * (1.0 - alpha))
    # -min(clipped, gamma): the same value and gradients as the hinge minus
    # gamma, without cancelling two numbers near gamma in float32.
    return -ops.sum(ops.minimum(clipped, gamma), axis=-1)


def margin_loss(distances, margin, sample_weight=None):
    """The margin loss of a batch.

    Per example, the hinge terms of every margin layer (`hinge_terms`) are
    averaged over the layers and weighted by ``sample_weight``; the loss is
    their batch mean (Keras' ``sum(w * t) / batch``).

    Args:
        distances: One ``[batch, competitors]`` float32 tensor of signed
            distances per margin layer, in the order of ``margin.layers``
            (from `marginfit.distances.layer_distances`).
        margin: The `LargeMargin` config.
        sample_weight: Optional ``[batch]`` (or ``[batch, 1]``) weights.

    Returns:
        The float32 scalar loss.
    """
    terms = [
        hinge_terms(layer_distances, gamma, margin.alpha, margin.aggregation)
        for layer_distances, gamma in zip(distances, margin.gamma)
    ]
    per_example = functools.reduce(ops.add, terms) / len(terms)
    if sample_weight is not None:
        per_example *= ops.reshape(ops.cast(sample_weight, keras.backend.floatx()), (-1,))
    return ops.mean(per_example)


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
    outputs = ops.cast(outputs, keras.backend.floatx())
    probabilities = ops.softmax(outputs, axis=-1) if output_kind == "logits" else outputs
    if sample_weight is None:
        weights = ops.ones_like(probabilities[:, :1])
    else:
        weights = ops.reshape(ops.cast(sample_weight, keras.backend.floatx()), (-1, 1))
    weighted = ops.sum(weights * probabilities, axis=0)
    return ops.concatenate([weighted, ops.reshape(ops.sum(weights), (1,))], axis=0)


def balance_from_sums(sums):
    """`balance_term` from `balance_sums` (of a batch, or added up over the
    replicas' parts of it); float32 scalar."""
    classes = sums.shape[0] - 1
    mean = ops.divide_no_nan(sums[:classes], sums[classes])
    return -ops.mean(ops.log(ops.maximum(mean, _TINY))) - math.log(classes)
