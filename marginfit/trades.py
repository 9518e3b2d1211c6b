"""TRADES (Zhang et al. 2019, arXiv 1901.08573): a `marginfit.Penalty`
whose step first solves an inner maximisation, then differentiates a loss
at its solution."""

import numbers

import keras
from keras import ops

from marginfit import attacks, backend, draws
from marginfit.divergence import check_perturbable, kl, log_probabilities, weighted_mean
from marginfit.penalty import Penalty, PenaltyResult


@keras.saving.register_keras_serializable(package="marginfit")
class TRADES(Penalty):
    """The robustness term of TRADES: ``weight * KL(f(x) || f(x'))``, where
    ``x'`` maximises that KL divergence in the L-inf ball of radius ``eps``.

    With the cross-entropy compiled as the model's loss, the training loss
    is the authors': ``CE(f(x), y) + beta * KL(f(x) || f(x'))``, ``beta``
    the ``weight``. Each step finds ``x'`` by ``steps`` signed-gradient
    steps of ``step_size`` up the KL divergence from ``x`` plus Gaussian
    noise of standard deviation ``start_std``, each projected onto the ball
    and ``clip``; the model runs in inference mode there and ``x'`` carries
    no gradient. The weights' gradient goes through both ``f(x)`` and
    ``f(x')``, as in the authors' code. Evaluation computes the same term,
    so ``val_trades_loss`` is the robustness term of the validation data.

    ```python
    model = marginfit.MarginModel(inputs, logits, penalty=marginfit.TRADES(eps=0.1))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ```

    Args:
        eps: L-inf radius of the inner maximisation, in input units (> 0).
        weight: ``beta`` >= 0; 1.0, the authors' MNIST setting.
        steps: Steps of the inner maximisation (>= 1); 40 on MNIST.
        step_size: Size of each step, in input units; None for ``eps / 30``,
            the authors' MNIST ratio (0.01 at eps 0.3).
        clip: ``(low, high)`` valid input range, or None.
        start_std: Standard deviation of the start's Gaussian noise; 0.001,
            the authors' setting.
    """

    name = "trades"  # logged as trades_loss

    def __init__(self, eps, weight=1.0, steps=40, step_size=None, clip=(0.0, 1.0), start_std=0.001):
        super().__init__(weight)
        # The inner maximisation is a PGD whose loss is the KL divergence.
        self.attack = attacks.PGD(
            eps, steps, eps / 30 if step_size is None else step_size, False, clip
        )
        if not (isinstance(start_std, numbers.Real) and start_std >= 0):
            raise ValueError(f"`start_std` must be a float >= 0; received {start_std!r}.")
        self.start_std = float(start_std)

    # --8<-- [start:call]
    def __call__(self, step):
        model = step.model
        outputs = model(step.x, training=step.training)
        log_p = log_probabilities(model, outputs)
        with step.gradients.unrecorded():
            x_adv = self.perturb(model, step.x, ops.stop_gradient(log_p), step.number)
        log_q = log_probabilities(model, model(x_adv, training=step.training))
        value = weighted_mean(kl(log_p, log_q), step.sample_weight)
        return PenaltyResult(outputs, self.weight * value, value)
        # --8<-- [end:call]

    def perturb(self, model, x, log_p, seed=0):
        """``[batch, ...]`` float32 ``x'``: the inner maximisation of the KL
        divergence from the ``[batch, classes]`` log-probabilities ``log_p``
        (of the clean ``x``), its start drawn from ``seed`` (an int)."""
        attack = self.attack
        x = ops.convert_to_tensor(x, "float32")
        start = x + self.start_std * draws.normal_like(x, draws.TRADES_START, seed)

        def divergence(points):
            return kl(log_p, log_probabilities(model, model(points, training=False)))

        def ascend(index, x_adv):
            gradient = backend.input_gradient(divergence, x_adv)
            moved = x_adv + attack.step_size * ops.sign(gradient)
            return attacks._project(moved, x, attack.eps, attack.clip)

        return ops.stop_gradient(ops.fori_loop(0, attack.steps, ascend, start))

    def check_model(self, model):
        check_perturbable(self, model)

    def get_config(self):
        attack = self.attack
        return {
            **super().get_config(),
            "eps": attack.eps,
            "steps": attack.steps,
            "step_size": attack.step_size,
            "clip": None if attack.clip is None else list(attack.clip),
            "start_std": self.start_std,
        }
