"""Per-group optimizers on Keras' MultiOptimizer, and BacktrackingSGD."""

import keras
import numpy as np
import pytest
import rounding
from helpers import CE, conv_net, digits, margin_for, reference_gradients
from nets import float64

import marginfit
from marginfit import BacktrackingSGD, discriminative_optimizer

SGD = keras.optimizers.SGD


def two_group_step(margin, features, head, fit_options=None, **compile_options):
    """Weights before and after one fit() step with ``features`` on the conv
    layer and ``head`` on dense + logits; and the model."""
    model, _ = conv_net(margin)
    optimizer = discriminative_optimizer(model, [(features, ["conv"]), (head, ["dense", "logits"])])
    # A new loss: a loss computes in the floatx of its creation.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer, loss=loss, **compile_options)
    x, y = digits(8, dtype=keras.config.floatx())
    before = [w.numpy() for w in model.trainable_weights]
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, **(fit_options or {}))
    return model, before, [w.numpy() for w in model.trainable_weights]


def expected_gradients(margin):
    fresh, fresh_taps = conv_net(margin)
    x, y = digits(8)
    return reference_gradients(fresh, fresh_taps, x, y, margin)


# conv/kernel, conv/bias belong to the first group; the rest to the second.
FEATURES = slice(0, 2)
HEAD = slice(2, None)


@pytest.mark.parametrize("approximate", [True, False])
def test_each_group_steps_with_its_own_rate(approximate):
    margin = margin_for(2, top_k=2, approximate=approximate)
    _, before, after = two_group_step(margin, SGD(0.5, name="features"), SGD(0.05, name="head"))
    gradients = expected_gradients(margin)
    rates = [0.5, 0.5, 0.05, 0.05, 0.05, 0.05]
    for w0, w1, g, rate in zip(before, after, gradients, rates):
        np.testing.assert_allclose(w1 - w0, -rate * g, rtol=2e-4, atol=2e-7)


def test_xla_matches_graph_mode():
    """One Adam / Nadam step under XLA is graph mode's, in float64: the two
    differ only in the order of their sums (`rounding`), which Adam's
    first step ``lr * g / (|g| + epsilon)`` can magnify up to
    ``lr / epsilon`` times (1e5) where a gradient entry is near 0 --
    float32's rounding could then reach the step itself."""
    margin = margin_for(2, top_k=2)
    with float64():
        results = [
            two_group_step(
                margin,
                keras.optimizers.Adam(1e-2, name="features"),
                keras.optimizers.Nadam(1e-3, name="head"),
                jit_compile=jit_compile,
            )[1:]
            for jit_compile in (False, True)
        ]
    (before, graph), (_, xla) = results
    assert rounding.max_difference(graph, before) > 1e-3
    rounding.assert_same_weights(xla, graph)


CLIP = 0.05


def test_clipping_applies_within_each_group():
    margin = margin_for(2, top_k=2)
    features = SGD(0.5, global_clipnorm=CLIP, name="features")
    head = SGD(0.5, clipnorm=CLIP, name="head")
    _, before, after = two_group_step(margin, features, head)
    gradients = expected_gradients(margin)
    # global_clipnorm: one norm over the group's gradients.
    group_norm = np.sqrt(sum(np.sum(g**2) for g in gradients[FEATURES]))
    assert group_norm > CLIP  # the clipping is active
    for w0, w1, g in zip(before[FEATURES], after[FEATURES], gradients[FEATURES]):
        np.testing.assert_allclose(w1 - w0, -0.5 * g * CLIP / group_norm, rtol=2e-4, atol=1e-7)
    # clipnorm: one norm per variable.
    scales = [min(1.0, CLIP / np.linalg.norm(g)) for g in gradients[HEAD]]
    assert min(scales) < 1.0
    for w0, w1, g, scale in zip(before[HEAD], after[HEAD], gradients[HEAD], scales):
        np.testing.assert_allclose(w1 - w0, -0.5 * g * scale, rtol=2e-4, atol=1e-7)


def test_learning_rate_schedules_run_per_group():
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model, _ = conv_net(margin_for(2))
    optimizer = discriminative_optimizer(
        model,
        [(SGD(decay, name="features"), ["conv"]), (SGD(0.01, name="head"), ["dense", "logits"])],
    )
    model.compile(optimizer, loss=CE)
    x, y = digits(24)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    features, head = optimizer.optimizers[1], optimizer.optimizers[0]
    assert int(features.iterations) == int(head.iterations) == 3
    np.testing.assert_allclose(float(features.learning_rate), 0.1 * 0.5**3, rtol=1e-6)
    np.testing.assert_allclose(float(head.learning_rate), 0.01, rtol=1e-6)


def group_rates_after(callback, epochs=3):
    model, _ = conv_net(margin_for(2))
    optimizer = discriminative_optimizer(
        model,
        [(SGD(0.2, name="features"), ["conv"]), (SGD(0.02, name="head"), ["dense", "logits"])],
    )
    model.compile(optimizer, loss=CE)
    x, y = digits(16)
    history = model.fit(x, y, epochs=epochs, batch_size=8, callbacks=[callback], verbose=0)
    rates = {opt.name: float(opt.learning_rate) for opt in optimizer.optimizers}
    return rates, history.history


def test_group_scheduler_keeps_the_ratios():
    rates, history = group_rates_after(
        marginfit.GroupLearningRateScheduler(lambda epoch: 0.5**epoch)
    )
    np.testing.assert_allclose(
        [rates["features"], rates["head"]], [0.2 * 0.25, 0.02 * 0.25], rtol=1e-6
    )
    np.testing.assert_allclose(history["learning_rate_head"], [0.02, 0.01, 0.005], rtol=1e-6)
    # Explicit base rates, as when resuming a run.
    rates, _ = group_rates_after(
        marginfit.GroupLearningRateScheduler(
            lambda epoch: 1.0, base_rates={"features": 0.3, "head": 0.03}
        ),
        epochs=1,
    )
    np.testing.assert_allclose([rates["features"], rates["head"]], [0.3, 0.03], rtol=1e-6)


def test_keras_schedulers_on_groups():
    # schedule(epoch, lr) scales each group: ratios kept.
    relative, _ = group_rates_after(
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    )
    np.testing.assert_allclose(
        [relative["features"], relative["head"]], [0.2 / 8, 0.02 / 8], rtol=1e-6
    )


def test_reduce_lr_on_plateau_keeps_the_ratios():
    rates, history = group_rates_after(
        keras.callbacks.ReduceLROnPlateau(monitor="loss", mode="max", patience=0, factor=0.5)
    )
    # mode="max", patience 0: each epoch whose loss is not the highest yet
    # halves every group's rate (the loss falls, so at least one does).
    best, halvings = -np.inf, 0
    for loss in history["loss"]:
        best, halvings = (loss, halvings) if loss > best else (best, halvings + 1)
    assert halvings >= 1
    np.testing.assert_allclose(
        [rates["features"], rates["head"]], [0.2 / 2**halvings, 0.02 / 2**halvings], rtol=1e-6
    )
    assert {"learning_rate_features", "learning_rate_head"} <= set(history)


def nested_model():
    keras.utils.set_random_seed(0)
    block = keras.Sequential(
        [keras.layers.Dense(8, name="inner_a"), keras.layers.Dense(8, name="inner_b")],
        name="block",
    )
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, name="logits")(block(inputs))
    return keras.Model(inputs, outputs), block


def routed(optimizer, model):
    """``{variable path: sub-optimizer name}`` as the MultiOptimizer routes."""
    optimizer.build(model.trainable_variables)
    return {
        v.path: optimizer.optimizers[optimizer._var_to_optimizer_idx[optimizer._var_key(v)]].name
        for v in model.trainable_variables
    }


def test_nested_layers_by_object_name_and_path():
    model, block = nested_model()
    optimizer = discriminative_optimizer(
        model,
        [
            (SGD(name="first"), [block.layers[0]]),
            (SGD(name="second"), "block/inner_b"),
            (SGD(name="third"), ["logits"]),
        ],
    )
    assert routed(optimizer, model) == {
        "block/inner_a/kernel": "first",
        "block/inner_a/bias": "first",
        "block/inner_b/kernel": "second",
        "block/inner_b/bias": "second",
        "logits/kernel": "third",
        "logits/bias": "third",
    }
    model, block = nested_model()
    whole = discriminative_optimizer(
        model, [(SGD(name="block"), [block])], default=SGD(name="rest")
    )
    assert routed(whole, model)["block/inner_b/bias"] == "block"
    assert routed(whole, model)["logits/kernel"] == "rest"


def test_layer_names_with_regex_characters_are_escaped():
    inputs = keras.Input((4,))
    first = keras.layers.Dense(4, name="dense.1")(inputs)
    second = keras.layers.Dense(4, name="dense+1")(first)
    third = keras.layers.Dense(3, name="dense_1")(second)
    model = keras.Model(inputs, third)
    optimizer = discriminative_optimizer(
        model,
        [(SGD(name="a"), ["dense.1"]), (SGD(name="b"), ["dense+1"]), (SGD(name="c"), ["dense_1"])],
    )
    assert set(routed(optimizer, model).items()) == {
        ("dense.1/kernel", "a"),
        ("dense.1/bias", "a"),
        ("dense+1/kernel", "b"),
        ("dense+1/bias", "b"),
        ("dense_1/kernel", "c"),
        ("dense_1/bias", "c"),
    }


@pytest.mark.parametrize(
    "groups, default, message",
    [
        ([(SGD(name="a"), ["nope"])], None, "does not have. Its layers are"),
        (
            [(SGD(name="a"), ["conv"]), (SGD(name="b"), ["conv", "dense"])],
            None,
            "Put each layer in one group",
        ),
        ([(SGD(name="a"), ["conv", "dense"])], None, "belong to no group"),
        ([(SGD(name="a"), ["conv"]), (SGD(name="a"), ["dense", "logits"])], None, "name="),
        ([(SGD(name="a"), ["flatten"])], SGD(name="b"), "no trainable variables"),
        ([(SGD(name="a"), [])], None, "names no layer"),
        (
            [(keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(SGD())), ["conv"])],
            None,
            "plain Keras optimizer",
        ),
        (
            [(SGD(name="a"), ["conv", keras.layers.Dense(3)])],
            SGD(name="b"),
            "is not a layer of model",
        ),
    ],
)
def test_group_errors_name_the_fix(groups, default, message):
    model, _ = conv_net(margin_for(2))
    with pytest.raises(ValueError, match=message):
        discriminative_optimizer(model, groups, default=default)


def test_unassigned_variables_are_named_and_shared_optimizers_refused():
    model, _ = conv_net(margin_for(2))
    with pytest.raises(ValueError, match=r"\['logits/kernel', 'logits/bias'\]"):
        discriminative_optimizer(model, [(SGD(name="a"), ["conv", "dense"])])
    shared = SGD(name="shared")
    with pytest.raises(ValueError, match="same optimizer instance"):
        discriminative_optimizer(model, [(shared, ["conv"]), (shared, ["dense", "logits"])])
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="is not built"):
        discriminative_optimizer(unbuilt, [(SGD(), [unbuilt.layers[0]])])


def backtracking_reference(weights, gradients, learning_rate):
    """The BacktrackingSGD rule in numpy, one step per gradient."""
    w = weights.copy()
    previous_w, previous_g = np.zeros_like(w), np.zeros_like(w)
    for g in gradients:
        stepped_back = g * previous_g < 0
        new = np.where(stepped_back, (previous_w + w) / 2, w - learning_rate * g)
        previous_w, previous_g, w = w, g, new
    return w


def test_backtracking_sgd_follows_its_rule():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(5, 3)).astype("float32")
    gradients = [rng.normal(size=(5, 3)).astype("float32") for _ in range(6)]
    variable = keras.Variable(weights)
    optimizer = BacktrackingSGD(0.1)
    for g in gradients:
        optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
    expected = backtracking_reference(weights, gradients, 0.1)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
    # Both branches were taken: the rule is not plain SGD.
    plain = weights - 0.1 * np.sum(gradients, axis=0)
    assert not np.allclose(expected, plain)
    assert len(optimizer.variables) == 2 + 2  # iteration, rate, two slots


def test_backtracking_sgd_trains_a_margin_model_in_fit():
    model, _ = conv_net(margin_for(2))
    model.compile(BacktrackingSGD(0.05), loss=CE)
    x, y = digits(64)
    before = model.evaluate(x, y, return_dict=True, verbose=0)["loss"]
    model.fit(x, y, batch_size=16, epochs=5, verbose=0)
    assert model.evaluate(x, y, return_dict=True, verbose=0)["loss"] < before
    assert int(model.optimizer.iterations) == 20


def test_weight_average_is_the_moving_average_of_every_step():
    """`networks.margin_classifier(ema_momentum=m)`: through MarginModel's
    step, fit() ends with Keras' average of the weights after each step
    (the first step's weights, then ``m * average + (1 - m) * weights``),
    computed here in float64 from the weights recorded after every step."""
    momentum, steps = 0.8, 6
    network = marginfit.networks.classifier((8, 8, 1), 10, conv_filters=(4,), dense_units=(8,))
    margin = marginfit.LargeMargin(marginfit.networks.margin_layers(network))
    model = marginfit.networks.margin_classifier(network, margin, ema_momentum=momentum)
    trajectory = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: trajectory.append(
            [w.numpy().astype("float64") for w in model.trainable_weights]
        )
    )
    x, y = digits(8 * steps)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[record], verbose=0)
    average = trajectory[0]
    for weights in trajectory[1:]:
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
    # Each float32 step rounds by at most a few ulps of the largest weight.
    for actual, expected in zip(model.trainable_weights, average, strict=True):
        bound = 4 * steps * np.finfo("float32").eps * np.abs(expected).max()
        np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=bound)
    assert not np.allclose(model.trainable_weights[0].numpy(), trajectory[-1][0])


@pytest.mark.parametrize("momentum", [1.0, -0.1, 2])
def test_weight_average_momentum_out_of_range_is_refused(momentum):
    network = marginfit.networks.classifier((8, 8, 1), 10, conv_filters=(4,), dense_units=(8,))
    with pytest.raises(ValueError, match=r"`ema_momentum` must be in \[0, 1\).*None"):
        marginfit.networks.margin_classifier(network, None, ema_momentum=momentum)
