"""Models with several outputs or inputs, each checked against plain
`keras.Model` on the same weights or a closed form, on the backend that
``KERAS_BACKEND`` names (`test_multi_task.py` runs them on every backend;
run as a script, it runs them all)."""

import keras
import numpy as np
import rounding

import marginfit

N, FEATURES, EXTRA, BATCH = 250, 12, 3, 32
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    extra = rng.normal(size=(N, EXTRA)).astype("float32")
    return x, extra, rng.integers(0, 10, N), rng.integers(0, 2, N), rng.normal(size=(N, 1))


def _heads(model_class, widths=(10, 2), **options):
    """``inputs -> hidden -> {digit, aux[, size]}`` of ``model_class``."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((FEATURES,), name="image")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    heads = [keras.layers.Dense(w, name=n) for w, n in zip(widths, ("digit", "aux", "size"))]
    return model_class(inputs, [head(hidden) for head in heads], **options)


def check_two_heads_without_penalty():
    """Two heads (10 and 2 classes, then 10 and 10), no penalty: every log of
    an epoch with a partial last batch is plain Keras' (SGD at rate 0)."""
    x, _, digit, aux, _ = _data()
    for widths in ((10, 2), (10, 10)):
        histories = []
        for model_class in (keras.Model, marginfit.MarginModel):
            model = _heads(model_class, widths)
            model.compile(keras.optimizers.SGD(0.0), loss=[SCCE, SCCE])
            fitted = model.fit(x, [digit, aux], batch_size=BATCH, epochs=1, verbose=0)
            evaluated = model.evaluate(x, [digit, aux], batch_size=BATCH, verbose=0)
            histories.append({**{k: v[0] for k, v in fitted.history.items()}, "eval": evaluated})
        plain, ours = histories
        assert ours.pop("nonfinite_steps") == 0  # marginfit's own log
        assert plain.keys() == ours.keys(), (plain.keys(), ours.keys())
        for key in plain:
            # Sums of the same float32 terms in the same order: equal, up to
            # one rounding of each batch's mean per batch accumulated.
            bound = (N // BATCH + 1) * rounding.FLOAT32_EPS * np.abs(plain[key]).max()
            assert np.abs(np.subtract(plain[key], ours[key])).max() <= bound, (key, plain, ours)


def check_margin_on_a_named_output():
    """A margin on output ``digit`` of a model with a 2-class auxiliary head
    and a regression head: evaluation logs the margin of the one-output
    model on the same layers and plain Keras' compiled losses, and one SGD
    step moves each weight by plain Keras' step plus the margin's alone."""
    x, _, digit, aux, size = _data()
    y, losses = [digit, aux, size], [SCCE, SCCE, "mse"]
    margin = marginfit.LargeMargin(["input", "hidden"])
    ours = _heads(marginfit.MarginModel, (10, 2, 1), margin=margin, penalty_output="digit")
    plain = keras.Model(ours.inputs, ours.outputs)
    alone = marginfit.MarginModel(ours.inputs, ours.outputs[0], margin=margin)
    for model, loss in ((ours, losses), (plain, losses), (alone, None)):
        model.compile(keras.optimizers.SGD(0.1), loss=loss)
    logs = ours.evaluate(x, y, batch_size=N, return_dict=True, verbose=0)
    plain_logs = plain.evaluate(x, y, batch_size=N, return_dict=True, verbose=0)
    alone_logs = alone.evaluate(x, digit, batch_size=N, return_dict=True, verbose=0)
    for key in ("margin_loss", "distance_input", "distance_hidden"):
        np.testing.assert_allclose(logs[key], alone_logs[key], rtol=1e-6, err_msg=key)
    for key in ("digit_loss", "aux_loss", "size_loss"):
        np.testing.assert_allclose(logs[key], plain_logs[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(logs["loss"], plain_logs["loss"] + logs["margin_loss"], rtol=1e-6)

    before = [w.numpy() for w in ours.trainable_weights]
    steps = []
    for model, labels in ((plain, y), (alone, digit)):
        model.fit(x, labels, batch_size=N, epochs=1, verbose=0, shuffle=False)
        steps.append([w.numpy() - b for w, b in zip(model.trainable_weights, before)])
        for weight, value in zip(ours.trainable_weights, before):
            weight.assign(value)
    ours.fit(x, y, batch_size=N, epochs=1, verbose=0, shuffle=False)
    for weight, b, plain_step, margin_step in zip(ours.trainable_weights, before, *steps):
        rounding.assert_same_step(weight.numpy(), b + plain_step + margin_step, b)
    assert max(np.abs(s).max() for s in steps[1]) > 1e-4  # the margin moved them


def check_ambiguous_heads_are_refused():
    """Two classification heads and no `penalty_output`: the error names it."""
    try:
        _heads(marginfit.MarginModel, margin=marginfit.LargeMargin(["input"]))
    except ValueError as error:
        assert "penalty_output='digit'" in str(error).splitlines()[0], error
    else:
        raise AssertionError("two classification heads were accepted")


def _two_inputs(dict_inputs):
    """A linear classifier of ``image`` and ``extra``: logits = W [image, extra] + b."""
    keras.utils.set_random_seed(2)
    image = keras.Input((FEATURES,), name="image")
    extra = keras.Input((EXTRA,), name="extra")
    logits = keras.layers.Dense(10, name="logits")(keras.layers.Concatenate()([image, extra]))
    inputs = {"image": image, "extra": extra} if dict_inputs else [image, extra]
    margin = marginfit.LargeMargin(["input:image"], competitors="top")
    return marginfit.MarginModel(inputs, logits, margin=margin)


def check_margin_on_a_named_input():
    """The margin on ``"input:image"`` of a two-input linear model (inputs as
    a dict or a list): each distance is the closed form in the image's
    units, ``min_j (z_y - z_j) / ||W_image[:, y] - W_image[:, j]||``."""
    x, extra, digit, _, _ = _data()
    for dict_inputs in (True, False):
        model = _two_inputs(dict_inputs)
        inputs = {"image": x, "extra": extra} if dict_inputs else [x, extra]
        kernel, bias = (w.numpy().astype("float64") for w in model.get_layer("logits").weights)
        logits = np.concatenate([x, extra], axis=1).astype("float64") @ kernel + bias
        image = kernel[:FEATURES]
        differences = logits[np.arange(N), digit][:, None] - logits
        norms = np.linalg.norm(image[:, digit].T[:, :, None] - image[None], axis=1)
        own = np.arange(10) == digit[:, None]
        expected = np.where(own, np.inf, differences / np.where(own, 1.0, norms)).min(1)
        measured = model.margin_distances(inputs, digit, competitors=9)["input:image"]
        np.testing.assert_allclose(measured, expected, rtol=1e-4, atol=1e-6)
        model.compile("sgd", loss=SCCE)
        logs = model.evaluate(inputs, digit, batch_size=N, return_dict=True, verbose=0)
        assert np.isfinite(logs["margin_loss"]) and "distance_input:image" in logs, logs


def check_margin_on_a_dict_of_one_input():
    """A dict of one input tensor takes the margin on ``"input"``: the same
    logs as the model on the bare tensor, on the same layers."""
    x, _, digit, _, _ = _data()
    keras.utils.set_random_seed(3)
    image = keras.Input((FEATURES,), name="image")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")
    logits = keras.layers.Dense(10, name="logits")
    margin = marginfit.LargeMargin(["input", "hidden"])
    logs = []
    for inputs, data in (({"image": image}, {"image": x}), (image, x)):
        model = marginfit.MarginModel(inputs, logits(hidden(image)), margin=margin)
        model.compile("sgd", loss=SCCE)
        logs.append(model.evaluate(data, digit, batch_size=N, return_dict=True, verbose=0))
    assert logs[0].keys() == logs[1].keys()
    for key in logs[1]:
        np.testing.assert_allclose(logs[0][key], logs[1][key], rtol=1e-6, err_msg=key)


def check_two_inputs_need_a_name():
    """The margin on ``"input"`` of a two-input model: the error names both."""
    try:
        marginfit.MarginModel(
            *marginfit.activations.graph_ends(_two_inputs(False)),
            margin=marginfit.LargeMargin(["input"]),
        )
    except ValueError as error:
        assert "'input:image'" in str(error).splitlines()[0], error
    else:
        raise AssertionError("'input' of a two-input model was accepted")


def check_clone_model_keeps_the_options():
    """`keras.models.clone_model` keeps the class and every option, with
    fresh weights."""
    margin = marginfit.LargeMargin(["input", "hidden"], gamma=2.0)
    model = _heads(
        marginfit.MarginModel, (10, 2), margin=margin, penalty_output="digit",
        on_nonfinite="raise", update_rule=marginfit.SAM(0.05),
    )  # fmt: skip
    clone = keras.models.clone_model(model)
    assert type(clone) is type(model)
    assert clone.penalty == model.penalty and clone.penalty is not model.penalty
    for option in ("output_kind", "on_nonfinite", "penalty_output"):
        assert getattr(clone, option) == getattr(model, option), option
    assert clone.update_rule.get_config() == model.update_rule.get_config()
    assert not any(
        np.array_equal(a, b) for a, b in zip(clone.get_weights()[::2], model.get_weights()[::2])
    )


CHECKS = [value for name, value in sorted(globals().items()) if name.startswith("check_")]

if __name__ == "__main__":
    for check in CHECKS:
        check()
        print(check.__name__, "passed", flush=True)
