"""The backend-equality cases: the reference grid of `test_model.py`,
run by the same code on every Keras backend.

``python backend_worker.py WEIGHTS OUT`` (with ``KERAS_BACKEND`` set) runs
every case of `CASES` on `nets.conv_net` with the initial weights in the
``.npz`` file WEIGHTS and writes what each case gives to the ``.npz`` file
OUT; `tests/test_backends.py` runs the same cases on TensorFlow and the
reference and compares.
"""

import itertools
import os
import sys

import keras
import numpy as np
from nets import LAYERS, STEP_GRID, conv_net, digits, margin_for

import marginfit
from marginfit import attacks

EVALUATE = [
    # Every norm with top_k 1 and 3, and every pair of these with each
    # aggregation (a pairwise cover of the full grid of `test_model.py`).
    *(
        (f"evaluate norm={n} top_k={k} {a}", dict(norm=n, top_k=k, aggregation=a), {})
        for (n, k), a in zip(
            itertools.product([1, 2, np.inf], [1, 3]), ["max", "sum", "sum", "max", "max", "sum"]
        )
    ),
    *(
        (f"evaluate exact norm={n}", dict(norm=n, top_k=3, approximate=False), {})
        for n in [1, 2, np.inf]
    ),
    *(
        (
            f"evaluate weighted one-hot {space}",
            dict(norm=2, top_k=2, layer_weights=[0.5, 2.0, 1.5], space=space),
            dict(weighted=True, one_hot=True),
        )
        for space in ["probabilities", "logits"]
    ),
    # One batch: the balance term is a function of the batch's mean prediction.
    ("evaluate balance", dict(norm=2, balance=0.7), dict(weighted=True, batch_size=20)),
    # The library's defaults: sampled competitors (`marginfit.draws`) and the
    # balance term, in batches of 8, 8 and 4.
    ("evaluate defaults", dict(defaults=True), {}),
    # The second penalty: double backpropagation.
    ("evaluate input gradient", dict(input_gradient=True), dict(weighted=True)),
    # A penalty with an inner maximisation: TRADES (its start is drawn the
    # same on every backend).
    ("evaluate trades", dict(trades=True), dict(weighted=True)),
    ("evaluate probability outputs", dict(norm=2, top_k=2), dict(output="probabilities")),
    # Composed penalties (`marginfit.Penalties`): the defaults with double
    # backpropagation on one shared pass; TRADES (its own pass) with them.
    ("evaluate margin+input gradient", dict(composed=("margin", "input_gradient")), {}),
    ("evaluate trades+margin", dict(composed=("trades", "margin")), dict(weighted=True)),
    # Consistency penalties: VAT, and distillation from a second conv_net.
    ("evaluate vat", dict(vat=True), dict(weighted=True)),
    ("evaluate distillation", dict(distillation=True), {}),
]
"""``(name, margin options, data options)`` of the evaluation cases."""

STEP = [
    # Three SGD steps with the library's defaults (the draws change each step).
    ("step defaults, three steps", dict(defaults=True), dict(steps=3)),
    ("step input gradient", dict(input_gradient=True), {}),
    ("step trades", dict(trades=True), {}),
    ("step margin+input gradient", dict(composed=("margin", "input_gradient")), dict(steps=3)),
    ("step trades+margin", dict(composed=("trades", "margin")), {}),
    ("step vat+margin, three steps", dict(composed=("vat", "margin")), dict(steps=3)),
    (
        "step distillation+margin, sam",
        dict(composed=("distillation", "margin"), sam=dict(rho=0.05)),
        {},
    ),
    # Update rules (`marginfit.SAM`): two gradient passes of the penalties.
    (
        "step sam margin+input gradient, three steps",
        dict(composed=("margin", "input_gradient"), sam=dict(rho=0.05)),
        dict(steps=3),
    ),
    ("step adaptive sam", dict(defaults=True, sam=dict(rho=0.5, adaptive=True)), {}),
    *(
        (
            f"step approximate={p} norm={n} {a}",
            dict(norm=n, top_k=2, aggregation=a, approximate=p),
            {},
        )
        for p, n, a in STEP_GRID
    ),
]
"""The SGD-step cases (one step unless ``steps``)."""

ATTACKS = [
    *(
        (f"attack {name} {loss}", dict(norm=2), dict(attack=name, loss=loss))
        for name, loss in itertools.product(["fgsm", "pgd"], attacks.LOSSES)
    ),
    ("attack pgd random start", dict(norm=2), dict(attack="pgd", loss="ce", random_start=True)),
    *(
        (f"attack minimal norm={norm}", dict(norm=2), dict(attack="minimal", norm=norm))
        for norm in attacks.NORMS
    ),
    ("step adversary", dict(norm=2), dict(adversary=True)),
]
"""The attack cases on the predicted labels (PGD with and without its
random start, whose draws are the same on every backend; DeepFool without
the bisection), and one SGD step of PGD adversarial training with the
margin."""

CASES = EVALUATE + STEP + ATTACKS
LEARNING_RATE = 0.5
EPS = 0.1
ADVERSARY = attacks.PGD(EPS, steps=3)


def case_penalty(margin_options, weights):
    """The penalty of a case: `InputGradientPenalty`, `TRADES`, `VAT`,
    `Distillation` from a conv_net with weights 1.5 times ``weights`` (the
    student's), the library's default `LargeMargin` on conv_net's layers, a
    list of these (``composed``), or `margin_for`."""
    if "composed" in margin_options:
        return [
            case_penalty({"defaults" if n == "margin" else n: True}, weights)
            for n in margin_options["composed"]
        ]
    if margin_options.get("vat"):
        # xi far above float32 rounding: every backend finds the same direction.
        return marginfit.VAT(1.0, weight=2.0, xi=1.0)
    if margin_options.get("distillation"):
        teacher, _ = conv_net(seed=1)
        teacher.set_weights([1.5 * w for w in weights])
        return marginfit.Distillation(teacher, temperature=2.0, weight=3.0)
    if margin_options.get("input_gradient"):
        return marginfit.InputGradientPenalty(weight=3.0)
    if margin_options.get("trades"):
        return marginfit.TRADES(EPS, weight=2.0, steps=3, start_std=0.01)
    if margin_options.get("defaults"):
        return marginfit.LargeMargin(LAYERS)
    return margin_for(**margin_options)


def case_data(name, data_options):
    """``(x, y, sample_weight)`` of a case: 20 digits to evaluate in
    batches of 8, 8 and 4 or to attack, or ``steps`` batches of 8 for SGD
    steps."""
    x, y = digits(
        20 if name.startswith(("evaluate", "attack")) else 8 * data_options.get("steps", 1)
    )
    weights = np.linspace(0.1, 2.0, len(x)).astype("float32")
    labels = np.eye(10, dtype="float32")[y] if data_options.get("one_hot") else y
    return x, labels, weights if data_options.get("weighted") else None


def run_case(case, weights):
    """What one case gives on the current backend: the evaluation logs, or
    the trainable weights after one SGD step of `fit()`, as arrays."""
    name, margin_options, data_options = case
    output = data_options.get("output", "logits")
    adversary = ADVERSARY if data_options.get("adversary") else None
    rule = marginfit.SAM(**margin_options["sam"]) if "sam" in margin_options else None
    model, _ = conv_net(
        penalty=case_penalty(margin_options, weights),
        output=output,
        adversary=adversary,
        update_rule=rule,
    )
    model.set_weights(weights)
    x, y, sample_weight = case_data(name, data_options)
    if name.startswith("attack"):
        return run_attack(model, x, data_options)
    one_hot = data_options.get("one_hot")
    loss = (
        keras.losses.CategoricalCrossentropy
        if one_hot
        else keras.losses.SparseCategoricalCrossentropy
    )
    if name.startswith("evaluate"):
        model.compile(loss=loss(from_logits=output == "logits"))
        batch_size = data_options.get("batch_size", 8)
        logs = model.evaluate(
            x, y, sample_weight=sample_weight, batch_size=batch_size, return_dict=True, verbose=0
        )
        return {key: np.asarray(value) for key, value in logs.items()}
    model.compile(keras.optimizers.SGD(LEARNING_RATE), loss=loss(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return {f"weight{i}": np.asarray(w) for i, w in enumerate(model.trainable_weights)}


def run_attack(model, x, options):
    """``{"x_adv": ...}`` (and ``"sizes"`` of minimal perturbations) of an
    attack on the model's own predictions."""
    predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
    if options["attack"] == "minimal":
        # Without the bisection, whose halvings snap nearby lengths apart.
        sizes, x_adv = attacks.minimal_perturbation(
            model, x, predicted, norm=options["norm"], bisection=0
        )
        return {"sizes": sizes, "x_adv": x_adv}
    if options["attack"] == "fgsm":
        x_adv = attacks.fgsm(model, x, predicted, EPS, loss=options["loss"])
    else:
        x_adv = attacks.pgd(
            model,
            x,
            predicted,
            EPS,
            steps=3,
            random_start=options.get("random_start", False),
            loss=options["loss"],
        )
    return {"x_adv": np.asarray(x_adv)}


def main(weights_path, out_path):
    with np.load(weights_path) as stored:
        weights = [stored[f"w{i}"] for i in range(len(stored.files))]
    results = {}
    for case in CASES:
        for key, value in run_case(case, weights).items():
            results[f"{case[0]}|{key}"] = value
    if keras.backend.backend() == "torch":
        model = conv_net(margin_for(2))[0]
        try:
            model.compile(loss="mse", jit_compile=True)
        except ValueError as error:
            results["refusals|jit_compile"] = np.array(str(error))
        saved = os.path.join(os.path.dirname(out_path), "saved")
        try:
            marginfit.save_model(model, saved)
        except NotImplementedError as error:
            results["refusals|save_model"] = np.array(str(error))
        results["refusals|save_model_wrote"] = np.array(os.path.exists(saved))
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
