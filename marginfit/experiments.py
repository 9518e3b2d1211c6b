"""A training run's settings as data: `Experiment` (the data, label noise,
network, optimizers, weight average, margin and adversarial training of
one run) and its presets. `marginfit train` and `compare` map their flags
onto it (each field carries its flag's help), the benchmarks and
`marginfit.tuning.MarginHyperModel` take one, and it builds the model.

```python
experiment = marginfit.experiments.Experiment(epochs=20, label_noise=0.4)
(x_train, y_train), test = experiment.load()
model, margin = experiment.build(x_train.shape[1:], 10, num_examples=len(x_train))
```
"""

import argparse
import dataclasses
import math

import keras
import numpy as np

from marginfit import data as data_lib
from marginfit import methods, networks
from marginfit.input_gradient import InputGradientPenalty
from marginfit.margin import LargeMargin
from marginfit.update_rule import SAM

# ------------------------------------------------- parsers of the values


def floats(text):
    """Comma-separated numbers as a list of floats."""
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, received {text!r}"
        ) from None


def _rate(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), received {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), received {text}")
    return value


def _choice(*choices):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(choices)}, received {text}"
            )
        return text

    return parse


def _non_negative(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, received {text}")
    return value


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, received {text}")
        return value

    return parse


def _setting(default, group, parse, help_text):
    """A field that is also a flag of the `marginfit` command: ``--name``
    (underscores as dashes), parsed by ``parse`` (``bool`` for a switch)."""
    return dataclasses.field(
        default=default, metadata={"group": group, "parse": parse, "help": help_text}
    )


# --------------------------------------------------------- the settings


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The settings of one training run (each field's help is its flag's,
    ``marginfit train --help``). Fields without a flag shape the network."""

    data: str = _setting(
        "digits",
        "data",
        str,
        "'digits' (bundled with scikit-learn, the default), 'digits28' (the same digits "
        "resized to 20x20 and placed at random in 28x28), a .npz file with "
        "x_train/y_train/x_test/y_test (or x/y, split 75/25), or "
        f"{'/'.join(data_lib.KERAS_DATASETS)} (downloaded by keras.datasets; needs network)",
    )
    label_noise: float = _setting(
        0.0, "data", _rate, "share of training labels replaced by a random other class (default 0)"
    )
    epochs: int = _setting(
        60, "training", _positive(int), "epochs (default 60, the authors' setting)"
    )
    batch_size: int = _setting(64, "training", _positive(int), "batch size (default 64)")
    lr_features: float = _setting(
        1e-3,
        "training",
        _positive(float),
        "learning rate of the conv (or first dense) layers (default 1e-3)",
    )
    lr_head: float = _setting(
        1e-3, "training", _positive(float), "learning rate of the other layers (default 1e-3)"
    )
    optimizer: str = _setting(
        "adam",
        "training",
        _choice(*networks.OPTIMIZERS),
        "'adam' (default) or 'rmsprop': the authors' RMSProp (epsilon 1e-2, rate x0.96 "
        "every 2000 steps, gradients clipped to norm 5 per layer group)",
    )
    ema: float = _setting(
        0.99,
        "training",
        _rate,
        "momentum of the moving average of the weights (Keras' use_ema) that the val_ "
        "logs, the test set and the saved model use (default 0.99; 0: the last weights)",
    )
    sam: float = _setting(
        0.0,
        "training",
        _non_negative,
        "radius rho of sharpness-aware minimization (marginfit.SAM: two gradient passes "
        "per step); default 0: off; 0.05 is the authors' default",
    )
    input_gradient: float = _setting(
        0.0,
        "training",
        _non_negative,
        "weight of the input-gradient penalty (marginfit.InputGradientPenalty) added to "
        "the method's loss; default 0: none",
    )
    batchnorm: bool = _setting(
        False, "training", bool, "batch normalization before each ReLU (default off)"
    )
    l2: float = _setting(
        0.0, "training", _non_negative, "L2 weight on every kernel and bias (default 0)"
    )
    validation_split: float = _setting(
        0.1,
        "training",
        _fraction,
        "share of the (noisy) training data held out for the val_ logs (default 0.1); "
        "the test set is evaluated once, after training",
    )
    seed: int = _setting(0, "training", int, "seed of weights, split and noise (default 0)")
    pgd_eps: float = _setting(
        0.1,
        "adversarial training (methods pgd-at, fgsm-at, trades)",
        _positive(float),
        "L-inf radius of the training attack, input units (default 0.1)",
    )
    pgd_steps: int = _setting(
        methods.PGD_STEPS,
        "adversarial training (methods pgd-at, fgsm-at, trades)",
        _positive(int),
        f"steps of the training attack of pgd-at and trades (default {methods.PGD_STEPS}, "
        "both authors' MNIST steps; step sizes 2.5 eps / steps and eps / 30)",
    )
    adversary: str = _setting(
        "none",
        "adversarial training (methods pgd-at, fgsm-at, trades)",
        _choice("none", "pgd", "fgsm"),
        "train any method on adversarial examples at --pgd-eps as well: 'pgd' "
        "(pgd-at's attack) or 'fgsm' (fgsm-at's: FGSM from a random start); "
        "default 'none'",
    )
    gamma: float = _setting(
        10000.0, "margin", _positive(float), "desired margin (default 10000, the authors' setting)"
    )
    alpha: float = _setting(
        4.0, "margin", _positive(float), "distances below gamma*(1-alpha) are clipped (default 4)"
    )
    norm: str = _setting(
        "2", "margin", _choice("1", "2", "inf"), "distance norm: 1, 2 or inf (default 2)"
    )
    competitors: str = _setting(
        "sampled",
        "margin",
        _choice("top", "sampled"),
        "competing classes: 'sampled' (drawn at random per example and step, the "
        "default) or 'top' (the highest-scoring, the authors' choice)",
    )
    top_k: int = _setting(1, "margin", _positive(int), "competitors per example (default 1)")
    aggregation: str = _setting(
        "max",
        "margin",
        _choice("max", "sum"),
        "'max' (the nearest competitor, default) or 'sum' (every one)",
    )
    exact: bool = _setting(
        False,
        "margin",
        bool,
        "differentiate through the gradient norm too (second-order backprop), so that "
        "the margin also shrinks the gradients, as robustness to perturbations needs "
        "(default off: the norm is a constant, the first-order approximation)",
    )
    space: str = _setting(
        "probabilities",
        "margin",
        _choice("probabilities", "logits"),
        "scores the margin compares: 'probabilities' (the softmax, the authors' "
        "choice and the default; gamma is then a switch, not a distance) or "
        "'logits' (gamma is a distance in the layer's units: pixels at the input)",
    )
    balance: float = _setting(
        1.0,
        "margin",
        _non_negative,
        "weight of the class-balance term, KL(uniform || batch-mean prediction), "
        "that keeps the network from predicting one class for everything "
        "(default 1; 0: the authors' loss)",
    )
    ce_weight: float = _setting(
        0.0,
        "margin",
        _non_negative,
        "weight of the cross-entropy next to the margin loss (default 0: the margin "
        "alone, the authors' setting, which resists label noise best)",
    )
    layer_weights: str = _setting(
        "none",
        "margin",
        _choice("none", "sizes"),
        "scale of each layer's gradient norm: 'none' (1, default) or 'sizes' (the "
        "layer's activation count, the authors' choice with the inf norm)",
    )
    layers: str = _setting(
        "all",
        "margin",
        str,
        "comma-separated margin layers: input, conv1, conv2, dense1 (flat inputs: "
        "dense1), or 'all' = input and every hidden layer (default); or a placement "
        "of marginfit.networks.margin_layers, e.g. 'input+last_hidden'",
    )
    conv_filters: tuple = (32, 64)
    kernel_size: int = 3
    dense_units: tuple = (128,)

    @classmethod
    def preset(cls, name, **changes):
        """The experiment of preset ``name`` (a key of `PRESETS`), with
        ``changes``."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; use one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **changes})

    def replace(self, **changes):
        """A copy with ``changes`` (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def flags(cls):
        """``[(group, field)]`` of the fields that are flags."""
        return [
            (field.metadata["group"], field)
            for field in dataclasses.fields(cls)
            if "group" in field.metadata
        ]

    # ------------------------------------------------------------ running

    def load(self):
        """``((x_train, y_train), (x_test, y_test))`` with ``label_noise`` of
        the training labels replaced by another class."""
        (x_train, y_train), test = data_lib.load(self.data, self.seed)
        if self.label_noise:
            classes = data_lib.num_classes(y_train, test[1])
            y_train = data_lib.add_label_noise(y_train, self.label_noise, classes, self.seed)
        return (x_train, y_train), test

    def margin(self, network):
        """The `LargeMargin` of these settings on ``network``'s layers."""
        if self.layers == "all":
            layers = networks.margin_layers(network)
        elif all(part in networks.PLACEMENTS for part in self.layers.split("+")):
            layers = networks.margin_layers(network, self.layers)
        else:
            layers = self.layers.split(",")
        weights = networks.layer_sizes(network, layers) if self.layer_weights == "sizes" else None
        return LargeMargin(
            layers,
            gamma=self.gamma,
            alpha=self.alpha,
            norm=np.inf if self.norm == "inf" else int(self.norm),
            competitors=self.competitors,
            top_k=self.top_k,
            aggregation=self.aggregation,
            space=self.space,
            balance=self.balance,
            approximate=not self.exact,
            layer_weights=weights,
        )

    def build(
        self, input_shape, num_classes, method=methods.MARGIN, num_examples=None, penalties=(),
        with_margin=False,
    ):  # fmt: skip
        """The `networks.classifier`, compiled with one optimizer per layer
        group for ``method`` (a name of `methods.NAMES`: its loss, penalty,
        adversary and weight regularizer; the margin only for ``"margin"``
        or ``with_margin``, ``adversary`` for any method without its own,
        ``sam`` and ``input_gradient`` for any method), with the other
        ``penalties`` (`marginfit.Penalty` objects) added to the method's
        (a `marginfit.Penalties`). Returns ``(model, margin)``, the margin
        of these settings either way. ``num_examples``, the training set's
        size, caps the weight average's span (`ema_momentum`) for short
        runs."""
        keras.utils.set_random_seed(self.seed)
        network = networks.classifier(
            input_shape,
            num_classes,
            conv_filters=tuple(self.conv_filters),
            kernel_size=self.kernel_size,
            dense_units=tuple(self.dense_units),
            batchnorm=self.batchnorm,
            l2=self.l2,
            l1=methods.WEIGHT_L1.get(method, 0.0),
        )
        margin = self.margin(network)
        penalty = (
            margin
            if method == methods.MARGIN
            else methods.penalty(method, self.pgd_eps, self.pgd_steps)
        )
        if with_margin and method != methods.MARGIN:
            penalties = (margin, *penalties)
        if self.input_gradient:
            penalties = (*penalties, InputGradientPenalty(weight=self.input_gradient))
        if penalties:
            penalty = [p for p in (penalty, *penalties) if p is not None]
        adversary = methods.adversary(method, self.pgd_eps, self.pgd_steps)
        if adversary is None and self.adversary != "none":
            kind = {"pgd": methods.PGD_TRAINING, "fgsm": methods.FGSM_TRAINING}[self.adversary]
            adversary = methods.adversary(kind, self.pgd_eps, self.pgd_steps)
        model = networks.margin_classifier(
            network,
            penalty,
            self.lr_features,
            self.lr_head,
            self.ce_weight if method == methods.MARGIN else 1.0,
            self.optimizer,
            self.ema_momentum(num_examples),
            loss=methods.loss(method),
            adversary=adversary,
            update_rule=SAM(self.sam) if self.sam else None,
        )
        return model, margin

    def ema_momentum(self, num_examples=None):
        """The optimizers' ``ema_momentum``: None where ``ema`` is 0, else
        ``ema``, lowered where needed so that the average's span,
        ``1 / (1 - momentum)`` steps, is at most `EMA_SHARE` of the run's
        steps on ``num_examples`` training examples (before the validation
        split)."""
        if not self.ema:
            return None
        if num_examples is None:
            return self.ema
        batches = math.ceil(num_examples * (1 - self.validation_split) / self.batch_size)
        return min(self.ema, max(0.0, 1 - 1 / (EMA_SHARE * self.epochs * batches)))

    def weight_average_callbacks(self, on_epoch_end=False):
        """``[keras.callbacks.SwapEMAWeights]`` where ``ema`` is on, so that
        validation (and, if ``on_epoch_end``, the callbacks after it at
        epoch end) sees the averaged weights; else ``[]``."""
        return [keras.callbacks.SwapEMAWeights(on_epoch_end)] if self.ema else []


EMA_SHARE = 0.1
"""Largest share of a run's steps that the weight average spans."""

PRESETS = {
    # The authors' MNIST configuration (their mnist_config.py and train.py):
    # the margin alone on the input and both conv layers, inf norm with the
    # layer sizes as weights, top-scoring competitor, RMSProp 0.1 with decay
    # and clipping, batch norm, L2 5e-4 * sum(w^2) / 2, batch 256, 200
    # epochs, 5x5 convs and a dense layer of 512.
    "authors": {
        "epochs": 200,
        "batch_size": 256,
        "gamma": 10000.0,
        "alpha": 4.0,
        "norm": "inf",
        "competitors": "top",
        "top_k": 1,
        "aggregation": "max",
        "layers": "input,conv1,conv2",
        "layer_weights": "sizes",
        "optimizer": "rmsprop",
        "lr_features": 0.1,
        "lr_head": 0.1,
        "batchnorm": True,
        "l2": 2.5e-4,
        "balance": 0.0,
        "ema": 0.0,
        "kernel_size": 5,
        "dense_units": (512,),
    },
    # The margin for L-inf robustness: on the input, in logit space (gamma is
    # a distance in pixels), the nearest boundary of the top-scoring
    # competitor, differentiated through the gradient norm (which the margin
    # must shrink), beside the cross-entropy at a tenth of the margin's
    # weight (chosen on validation PGD accuracy; see the robustness guide).
    "robust": {
        "layers": "input",
        "norm": "inf",
        "space": "logits",
        "competitors": "top",
        "top_k": 1,
        "gamma": 0.3,
        "balance": 0.0,
        "exact": True,
        "ce_weight": 0.1,
    },
}
"""Named settings: the changes each makes to `Experiment`'s defaults (flags
given as well override them)."""
