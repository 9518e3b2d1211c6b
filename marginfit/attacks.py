"""Input perturbations for robustness evaluation and adversarial training:
FGSM and PGD (L-inf), and the minimal perturbation that flips a prediction
(DeepFool, L2 or L-inf), which measures the distance to the boundary.

FGSM and PGD maximise the cross-entropy (or the Carlini-Wagner margin) of
the model's output for the true labels within an L-inf ball of radius
``eps`` around each input, clipped to the valid input range. The math is
`keras.ops`; the input gradients are the backend's (`marginfit.backend`:
`tf.GradientTape`, `jax.grad` or `torch.autograd.grad`). Every example is
attacked independently, in batches.
"""

import keras
import numpy as np

from marginfit import backend, draws
from marginfit.labels import is_one_hot

ops = keras.ops


def _check(eps, clip):
    if not eps >= 0:
        raise ValueError(f"`eps` must be >= 0 (an L-inf radius); received {eps!r}.")
    if clip is not None and not clip[0] < clip[1]:
        raise ValueError(f"`clip` must be (low, high) with low < high; received {clip!r}.")


def _from_logits(model):
    """Whether the model emits logits (`MarginModel` says; else assumed)."""
    return getattr(model, "output_kind", "logits") == "logits"


LOSSES = ("ce", "cw")
"""What the attacks maximise: the cross-entropy (``"ce"``) or the margin of
Carlini & Wagner (``"cw"``, the largest other logit minus the label's),
which does not saturate where a confident softmax flattens the cross-entropy
to a zero gradient (so an attack on it is not fooled by large logits)."""


def _as_logits(model, outputs):
    """``[batch, classes]`` logits of ``model``'s float32 ``outputs`` (the
    log of probabilities, which differ from the logits by a constant); of
    the one a penalty applies to where the model has several."""
    outputs = model.penalty_head(outputs) if hasattr(model, "penalty_head") else outputs
    return outputs if _from_logits(model) else ops.log(ops.maximum(outputs, 1e-30))


def _check_loss(loss):
    if loss not in LOSSES:
        raise ValueError(f"Unknown `loss={loss!r}`; use 'ce' (cross-entropy) or 'cw'.")


def _one_hot(y, classes):
    """``[batch, classes]`` float32 rows of class indices or one-hot ``y``."""
    if is_one_hot(y.shape, classes):
        return ops.cast(y, "float32")
    return ops.one_hot(ops.cast(ops.reshape(y, [-1]), "int32"), classes)


def _loss_gradient(model, x, y, loss="ce"):
    """``[batch, ...]`` gradient of each example's ``loss`` (see `LOSSES`)
    w.r.t. ``x``; ``y`` holds class indices or one-hot rows."""

    def losses(points):
        outputs = ops.cast(model(points, training=False), "float32")
        one_hot = _one_hot(y, outputs.shape[-1])
        if loss == "ce":
            return keras.losses.categorical_crossentropy(
                one_hot, outputs, from_logits=_from_logits(model)
            )
        logits = _as_logits(model, outputs)
        label = ops.sum(one_hot * logits, axis=-1)
        lowest = float(np.finfo(np.float32).min)
        other = ops.max(ops.where(one_hot > 0, lowest, logits), axis=-1)
        return other - label

    return backend.input_gradient(losses, x)


def _project(x_adv, x, eps, clip):
    x_adv = ops.clip(x_adv, x - eps, x + eps)
    return x_adv if clip is None else ops.clip(x_adv, *clip)


def fgsm(model, x, y, eps, clip=(0.0, 1.0), loss="ce"):
    """Fast gradient sign method: ``x + eps * sign(grad_x loss)``, clipped.

    Args:
        model: A Keras classifier (logits, or probabilities for a
            `MarginModel` with ``output="probabilities"``).
        x: ``[batch, ...]`` float inputs.
        y: ``[batch]`` integer labels.
        eps: L-inf radius, in input units.
        clip: ``(low, high)`` valid input range, or None.
        loss: What to maximise, ``"ce"`` or ``"cw"`` (see `LOSSES`).

    Returns:
        ``[batch, ...]`` float32 perturbed inputs.
    """
    _check(eps, clip)
    _check_loss(loss)
    x = ops.convert_to_tensor(x, "float32")
    y = ops.convert_to_tensor(y)
    gradient = _loss_gradient(model, x, y, loss)
    return _project(x + eps * ops.sign(gradient), x, eps, clip)


@keras.saving.register_keras_serializable(package="marginfit")
class PGD:
    """L-inf projected gradient descent (Madry et al. 2018, arXiv 1706.06083):
    an adversary to train against (``MarginModel(adversary=PGD(eps))``, PGD
    adversarial training) or to evaluate with (`pgd`).

    From a uniform random point of the ``eps`` ball around each input (if
    ``random_start``), ``steps`` signed-gradient steps of ``step_size`` up the
    ``loss`` of the true labels, each projected back onto the ball and the
    ``clip`` range. The model runs in inference mode; the result carries
    no gradient.

    Args:
        eps: L-inf radius, in input units (> 0).
        steps: Number of steps (>= 1); 40, the authors' MNIST setting.
        step_size: Size of each step, in input units; None for
            ``2.5 * eps / steps``, the rule of the authors' ``robustness``
            library (enough to cross the ball from any start; their MNIST
            training code steps ``eps / 30``).
        random_start: Whether to start from a uniform point of the ball.
        clip: ``(low, high)`` valid input range, or None.
        loss: What to maximise: ``"ce"`` (the cross-entropy, the authors'
            training attack) or ``"cw"`` (see `LOSSES`).
    """

    def __init__(
        self, eps, steps=40, step_size=None, random_start=True, clip=(0.0, 1.0), loss="ce"
    ):
        if not (isinstance(eps, (int, float)) and eps > 0 and np.isfinite(eps)):
            raise ValueError(f"`eps` must be a positive float (an L-inf radius); received {eps!r}.")
        _check(eps, clip)
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"`steps` must be an integer >= 1; received {steps!r}.")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"`step_size` must be > 0 or None; received {step_size!r}.")
        self.eps = float(eps)
        self.steps = steps
        self.step_size = 2.5 * self.eps / steps if step_size is None else float(step_size)
        self.random_start = bool(random_start)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        _check_loss(loss)
        self.loss = loss

    def perturb(self, model, x, y, seed=(0, 0)):
        """``[batch, ...]`` float32 adversarial inputs for ``(x, y)``.

        Args:
            model: A Keras classifier (logits, or probabilities for a
                `MarginModel` with ``output="probabilities"``).
            x: ``[batch, ...]`` float inputs.
            y: ``[batch]`` class indices, or ``[batch, classes]`` one-hot.
            seed: ``(stream, step)`` ints (or int tensors) that the random
                start is drawn from (`marginfit.draws`): the same numbers on
                every backend.
        """
        x = ops.convert_to_tensor(x, "float32")
        y = ops.convert_to_tensor(y)
        start = x
        if self.random_start:
            noise = draws.uniform_like(x, *seed, -self.eps, self.eps)
            start = _project(x + noise, x, self.eps, self.clip)

        def step(index, x_adv):
            gradient = _loss_gradient(model, x_adv, y, self.loss)
            moved = x_adv + self.step_size * ops.sign(gradient)
            return _project(moved, x, self.eps, self.clip)

        return ops.stop_gradient(ops.fori_loop(0, self.steps, step, start))

    def get_config(self):
        return {
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "clip": None if self.clip is None else list(self.clip),
            "loss": self.loss,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, PGD) and self.get_config() == other.get_config()

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"PGD({arguments})"


FAST_STEP = 1.25
"""The step of fast adversarial training, in units of eps (Wong et al.)."""


def fgsm_random_start(eps, clip=(0.0, 1.0)):
    """The adversary of fast adversarial training (Wong, Rice & Kolter 2020,
    arXiv 2001.03994): FGSM from a uniform random point of the ``eps`` ball,
    one step of 1.25 ``eps``, projected back onto the ball and ``clip``.

    It is `PGD` with one step (the start clipped to the valid range, as the
    authors' CIFAR-10 code does), so it saves and loads as one. Two forward
    and backward passes per batch, about what the margin costs; watch for
    catastrophic overfitting (`marginfit.callbacks.CatastrophicOverfitting`).

    ```python
    model = marginfit.MarginModel(inputs, logits,
                                  adversary=marginfit.attacks.fgsm_random_start(0.1))
    ```
    """
    return PGD(eps, steps=1, step_size=FAST_STEP * eps, random_start=True, clip=clip)


def pgd(
    model,
    x,
    y,
    eps,
    steps=10,
    step_size=None,
    random_start=True,
    clip=(0.0, 1.0),
    seed=0,
    loss="ce",
):
    """Projected gradient descent (Madry et al. 2018), L-inf: `PGD`'s
    perturbation of ``(x, y)``, with the random start drawn from ``seed``.

    ``eps=0`` returns ``x`` (clipped to ``clip``). ``loss`` is ``"ce"`` or
    ``"cw"`` (see `LOSSES`).

    Returns:
        ``[batch, ...]`` float32 perturbed inputs.
    """
    _check(eps, clip)
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1; received {steps!r}.")
    if eps == 0:
        x = ops.convert_to_tensor(x, "float32")
        return x if clip is None else ops.clip(x, *clip)
    attack = PGD(eps, steps, step_size, random_start, clip, loss)
    return attack.perturb(model, x, y, seed=(seed, 0))


def adversarial_accuracy(
    model, x, y, eps, attack="fgsm", batch_size=256, restarts=1, loss="ce", **options
):
    """Accuracy of ``model`` on ``attack``-perturbed ``x`` (``"fgsm"`` or
    ``"pgd"``), attacked in batches of ``batch_size``.

    ``loss`` is what the attack maximises, ``"ce"`` or ``"cw"`` (see
    `LOSSES`), or a tuple of both; with several losses, or ``restarts`` > 1
    (PGD from several random starts, seeds 0, 1, ...), an example counts as
    correct only if no attack fools the model. The unperturbed input is in
    the ball too: an example the model gets wrong counts as fooled, so the
    result never exceeds the clean accuracy."""
    attacks = {"fgsm": fgsm, "pgd": pgd}
    if attack not in attacks:
        raise ValueError(f"Unknown attack {attack!r}; use one of {sorted(attacks)}.")
    if not (isinstance(restarts, int) and restarts >= 1):
        raise ValueError(f"`restarts` must be an integer >= 1; received {restarts!r}.")
    losses = (loss,) if isinstance(loss, str) else tuple(loss)
    for name in losses:
        _check_loss(name)
    perturb = _compiled(model, attacks[attack], eps, options)
    correct = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], np.asarray(y[start : start + batch_size])
        robust = np.argmax(model.predict_on_batch(xb), axis=-1) == yb
        for name in losses:
            for restart in range(restarts if attack == "pgd" else 1):
                perturbed = perturb(xb, yb, name, restart)
                robust &= np.argmax(model.predict_on_batch(perturbed), axis=-1) == yb
        correct += int(robust.sum())
    return correct / len(x)


def _compiled(model, attack, eps, options):
    """``perturb(x, y, loss, seed)``: ``attack`` (`fgsm` or `pgd`) on
    ``model`` at ``eps`` as one compiled function per loss (`backend.traced`),
    so that its steps do not run one by one in eager mode."""
    functions = {}

    def perturb(x, y, loss, seed):
        if loss not in functions:

            def run(x, y, seed):
                seeded = {"seed": seed} if attack is pgd else {}
                return [attack(model, x, y, eps, loss=loss, **options, **seeded)]

            functions[loss] = backend.traced(model, run)
        x = np.asarray(x, np.float32)
        return functions[loss](x, np.asarray(y), np.asarray(seed, np.int32))[0]

    return perturb


NORMS = (2, "inf")
"""The norms `minimal_perturbation` measures in."""


def _logits(model, x):
    return ops.cast(_as_logits(model, model(x, training=False)), "float32")


def _take(values, indices):
    """``values[i, indices[i]]`` for ``[batch, classes, ...]`` values and
    ``[batch]`` int indices."""
    index = ops.reshape(indices, (-1,) + (1,) * (len(values.shape) - 1))
    return ops.squeeze(ops.take_along_axis(values, index, axis=1), axis=1)


def _norm(values, norm):
    """``[batch]`` L1, L2 or L-inf norms (``norm`` 1, 2 or "inf") of
    ``[batch, features]`` rows."""
    if norm == "inf":
        return ops.max(ops.abs(values), axis=-1)
    if norm == 1:
        return ops.sum(ops.abs(values), axis=-1)
    return ops.sqrt(ops.sum(ops.square(values), axis=-1))


def _deepfool_step(model, x_adv, labels, norm):
    """One DeepFool step at ``x_adv``: ``(step, predicted)``, the smallest
    perturbation that crosses the linearised nearest boundary between the
    label and another class (``[batch, ...]``) and the current predictions."""
    logits, jacobian = backend.outputs_and_jacobian(lambda x: _logits(model, x), x_adv)
    classes = logits.shape[-1]
    flat = ops.reshape(jacobian, (-1, classes, int(np.prod(x_adv.shape[1:]))))
    label_gradient = _take(flat, labels)  # [batch, features]
    directions = flat - label_gradient[:, None, :]  # grad (z_k - z_y)
    gaps = _take(logits, labels)[:, None] - logits  # z_y - z_k >= 0
    sizes = ops.reshape(
        _norm(ops.reshape(directions, (-1, flat.shape[-1])), 1 if norm == "inf" else 2),
        (-1, classes),
    )
    ratio = gaps / ops.maximum(sizes, 1e-12)
    ratio = ops.where(ops.one_hot(labels, classes) > 0, np.inf, ratio)
    nearest = ops.cast(ops.argmin(ratio, axis=-1), "int32")
    direction = _take(directions, nearest)
    distance = _take(ratio, nearest)[:, None]
    if norm == "inf":
        step = distance * ops.sign(direction)
    else:  # the dual norm is the L2 norm itself
        size = _take(sizes, nearest)[:, None]
        step = distance * direction / ops.maximum(size, 1e-12)
    predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
    return ops.reshape(step, (-1, *x_adv.shape[1:])), predicted


def minimal_perturbation(
    model, x, y, norm=2, steps=50, overshoot=0.02, bisection=10, batch_size=256
):
    """The smallest perturbation that changes each example's prediction, as
    DeepFool finds it (Moosavi-Dezfooli et al. 2016, arXiv 1511.04599),
    then shortened by bisection along it.

    Each DeepFool step moves every example still classified as its label
    across the linearised nearest boundary between the label and another
    class (``(z_y - z_k) / ||grad (z_y - z_k)||_*`` in the dual norm), with a
    ``1 + overshoot`` push; for a linear model the first step is exact.
    ``bisection`` halvings of the found perturbation's length then keep the
    shortest multiple that still flips the prediction. The sizes are upper
    bounds on the true minimum (any flipping perturbation is), in the units
    of the inputs; inputs are not clipped to a valid range.

    Args:
        model: A Keras classifier (logits, or probabilities for a
            `MarginModel` with ``output="probabilities"``).
        x: ``[batch, ...]`` float inputs.
        y: ``[batch]`` integer labels (the attack moves away from them;
            pass the predictions to measure from the decision itself).
        norm: ``2`` or ``"inf"``.
        steps: Most DeepFool steps per example (>= 1).
        overshoot: Relative push past each linearised boundary (>= 0).
        bisection: Number of halvings refining the length (>= 0).
        batch_size: Examples per batch.

    Returns:
        ``(sizes, x_adv)``: ``[batch]`` float32 perturbation norms (0 where
        the model already misclassifies the example, ``inf`` where no step
        flipped it) and the ``[batch, ...]`` perturbed inputs.
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown `norm={norm!r}`; use 2 or 'inf'.")
    for name, value, low in (("steps", steps, 1), ("bisection", bisection, 0)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"`{name}` must be an integer >= {low}; received {value!r}.")
    if not overshoot >= 0:
        raise ValueError(f"`overshoot` must be >= 0; received {overshoot!r}.")
    x = np.asarray(x, np.float32)
    y = np.asarray(y).reshape(-1).astype(np.int32)
    if len(x) != len(y):
        raise ValueError(f"`x` has {len(x)} examples and `y` {len(y)}; give one label each.")
    search = backend.traced(
        model, lambda xb, yb: _deepfool(model, xb, yb, norm, steps, overshoot, bisection)
    )
    sizes, perturbed = [], []
    for start in range(0, len(x), batch_size):
        size, x_adv = search(x[start : start + batch_size], y[start : start + batch_size])
        sizes.append(size)
        perturbed.append(x_adv)
    return np.concatenate(sizes), np.concatenate(perturbed)


def _deepfool(model, x, labels, norm, steps, overshoot, bisection):
    """`minimal_perturbation` of one batch, traced."""
    x = ops.convert_to_tensor(x, "float32")
    labels = ops.convert_to_tensor(labels, "int32")

    def per_example(values):  # [batch] to broadcast over x
        return ops.reshape(values, (-1,) + (1,) * (len(x.shape) - 1))

    def flipped(points):
        predicted = ops.cast(ops.argmax(_logits(model, points), axis=-1), "int32")
        return ops.not_equal(predicted, labels)

    def step(index, state):
        total, done = state
        move, predicted = _deepfool_step(model, x + (1.0 + overshoot) * total, labels, norm)
        done = ops.logical_or(done, ops.not_equal(predicted, labels))
        keep = per_example(ops.cast(done, "float32"))
        return total + (1.0 - keep) * move, done

    done = ops.zeros_like(labels, "bool")
    total, _ = ops.fori_loop(0, steps, step, (ops.zeros_like(x), done))
    perturbation = (1.0 + overshoot) * total
    success = flipped(x + perturbation)
    # Bisection on t in [0, 1]: x + t * perturbation flips at `high`.

    def halve(index, bounds):
        low, high = bounds
        middle = (low + high) / 2
        flips = flipped(x + per_example(middle) * perturbation)
        return ops.where(flips, low, middle), ops.where(flips, middle, high)

    bounds = (ops.zeros_like(labels, "float32"), ops.ones_like(labels, "float32"))
    _, high = ops.fori_loop(0, bisection, halve, bounds)
    already = flipped(x)
    high = ops.where(already, 0.0, high)
    x_adv = x + per_example(high) * perturbation
    sizes = _norm(ops.reshape(x_adv - x, (-1, int(np.prod(x.shape[1:])))), norm)
    sizes = ops.where(ops.logical_or(success, already), sizes, np.inf)
    return sizes, x_adv


def as_adversary(adversary):
    """A `PGD` from itself or its config; a `TypeError` for anything else."""
    if isinstance(adversary, dict):
        adversary = keras.saving.deserialize_keras_object(adversary)
    if not isinstance(adversary, PGD):
        raise TypeError(
            f"`adversary` must be a `marginfit.attacks.PGD` or None; received {adversary!r}."
        )
    return adversary
