"""Virtual adversarial training (Miyato et al. 2018, arXiv 1704.03976): a
consistency `marginfit.Penalty` whose step finds, by power iteration, the
input direction that changes the prediction most."""

import numbers

import keras
from keras import ops

from marginfit import backend, draws
from marginfit.divergence import check_perturbable, kl, log_probabilities, weighted_mean
from marginfit.penalty import Penalty, PenaltyResult


def _unit(d):
    """``d`` with each example scaled to L2 norm 1 (over all its axes)."""
    axes = tuple(range(1, len(d.shape)))
    return d / (ops.sqrt(ops.sum(ops.square(d), axis=axes, keepdims=True)) + 1e-12)


@keras.saving.register_keras_serializable(package="marginfit")
class VAT(Penalty):
    """``weight * KL(p(x) || p(x + r))``, ``r`` the virtual adversarial
    perturbation of L2 norm ``eps``; ``p(x)`` is held constant (no
    gradient), as in the authors' code, and labels are not used.

    ``r = eps * u(g)``, ``u`` the per-example unit vector and ``g`` the
    input gradient of ``KL(p(x) || p(x + xi * d))`` at a random unit ``d``
    (one power iteration per ``power_iterations``; the model runs in
    inference mode there, and ``r`` carries no gradient). Evaluation
    computes the same term (``val_vat_loss``).

    Args:
        eps: L2 norm of the perturbation, in input units (> 0; 2.0 in the
            authors' supervised MNIST setting).
        weight: ``alpha`` >= 0; 1.0, the authors' setting.
        xi: Size of the finite-difference step, in input units (1e-6, the
            authors'; float32 keeps about two digits of ``g`` there).
        power_iterations: Power iterations (>= 1); 1, the authors'.
    """

    name = "vat"  # logged as vat_loss

    def __init__(self, eps, weight=1.0, xi=1e-6, power_iterations=1):
        super().__init__(weight)
        if not (isinstance(eps, numbers.Real) and eps > 0 and xi > 0):
            raise ValueError(f"VAT needs eps > 0 and xi > 0; received eps={eps!r}, xi={xi!r}.")
        if not (isinstance(power_iterations, int) and power_iterations >= 1):
            raise ValueError(f"`power_iterations` must be an int >= 1; got {power_iterations!r}.")
        self.eps, self.xi, self.power_iterations = float(eps), float(xi), power_iterations

    def forward(self, step, outputs):
        return {}, None

    def finish(self, step, outputs, aux, recording):
        model = step.model
        log_p = ops.stop_gradient(log_probabilities(model, outputs))
        x = ops.convert_to_tensor(step.x, keras.backend.floatx())
        with step.gradients.unrecorded():
            r = self.perturbation(model, x, log_p, step.number)
        log_q = log_probabilities(model, model(x + r, training=step.training))
        value = weighted_mean(kl(log_p, log_q), step.sample_weight)
        return PenaltyResult(outputs, self.weight * value, value)

    def perturbation(self, model, x, log_p, seed=0):
        """``[batch, ...]`` ``r`` for inputs ``x`` whose predictions have the
        ``[batch, classes]`` log-probabilities ``log_p``; the random start is
        drawn from ``seed`` (an int)."""
        d = ops.cast(draws.normal_like(x, draws.VAT_START, seed), x.dtype)

        def divergence(r):
            return kl(log_p, log_probabilities(model, model(x + r, training=False)))

        for _ in range(self.power_iterations):
            d = backend.input_gradient(divergence, self.xi * _unit(d))
        return ops.stop_gradient(self.eps * _unit(d))

    def check_model(self, model):
        check_perturbable(self, model)

    def get_config(self):
        return {
            **super().get_config(),
            "eps": self.eps,
            "xi": self.xi,
            "power_iterations": self.power_iterations,
        }
