"""The models users bring: wrapped models that export and serve as they were,
margins inside nested (fine-tuning) models, several inputs, token inputs,
unbatched datasets, softmax outputs, and a keras.applications model end to
end."""

import warnings

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf
from helpers import CE, assert_model_file_round_trip, digits

from marginfit import LargeMargin, MarginModel

TOP = {"competitors": "top", "balance": 0.0}
"""What the naive reference computes: top-scoring competitors, no balance."""


def served(model, path):
    """``model`` exported to ``path`` and loaded back with TensorFlow."""
    model.export(str(path), verbose=False)
    return tf.saved_model.load(str(path))


# ------------------------------------------------ wrapped models serve as-is


def test_a_wrapped_one_input_model_serves_a_plain_tensor(tmp_path):
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(keras.layers.Flatten()(inputs))
    plain = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    model = MarginModel.wrap(plain, LargeMargin(["input", "hidden"]))
    x, _ = digits(6)
    assert model.input is plain.input  # one tensor, not a list of one
    archive = served(model, tmp_path / "a")
    np.testing.assert_allclose(archive.serve(x), model.predict(x, verbose=0))
    # The signature survives a .keras round trip.
    loaded = assert_model_file_round_trip(model, tmp_path / "model.keras", x)
    archive = served(loaded, tmp_path / "b")
    np.testing.assert_allclose(archive.serve(x), model.predict(x, verbose=0))


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_a_wrapped_two_input_model_serves_its_structure(tmp_path, structure):
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    hidden = keras.layers.Dense(6, activation="tanh", name="hidden")(
        keras.layers.Concatenate()([a, b])
    )
    inputs = [a, b] if structure == "list" else {"a": a, "b": b}
    plain = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model = MarginModel.wrap(plain, LargeMargin(["hidden"]))
    rng = np.random.default_rng(0)
    xa, xb = rng.random((5, 4), "float32"), rng.random((5, 3), "float32")
    x = [xa, xb] if structure == "list" else {"a": xa, "b": xb}
    archive = served(model, tmp_path / "a")
    np.testing.assert_allclose(archive.serve(x), model.predict(x, verbose=0), rtol=1e-6)


# ------------------------------------------------ margins inside nested models


def fine_tuning_net(frozen):
    """``outputs = head(base(inputs))``: a Functional base with batch norm,
    called with ``training=False`` as transfer learning does, and a
    Sequential head. Returns the outer model and a tap function written
    layer by layer: ``x -> [logits, base/inner_relu]``."""
    keras.utils.set_random_seed(0)
    base_inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, name="inner_conv")(base_inputs)
    normed = keras.layers.BatchNormalization(name="inner_bn")(conv)
    relu = keras.layers.ReLU(name="inner_relu")(normed)
    base = keras.Model(base_inputs, relu, name="base")
    base.trainable = not frozen
    head = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="tanh", name="head_dense"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="head",
    )
    inputs = keras.Input((8, 8, 1))
    outer = keras.Model(inputs, head(base(inputs, training=False)), name="outer")

    def taps(x, training=False, base_training=None):
        """``base_training``: the batch norm's mode (``training`` if None)."""
        base_training = training if base_training is None else base_training
        h = base.get_layer("inner_conv")(x)
        h = base.get_layer("inner_relu")(base.get_layer("inner_bn")(h, training=base_training))
        return [head(h, training=training), h]

    return outer, taps


def keras_mode_of_the_base(outer, taps, x):
    """The mode Keras runs ``base(inputs, training=False)`` in when the outer
    model trains: Keras 3.15 passes the outer ``training`` on, overriding
    the call's; Keras 3.16 keeps the call's ``False``. Read off Keras' own
    forward pass (one of the two must be it; a frozen base's batch norm runs
    in inference mode either way)."""
    statistics = [variable.numpy() for variable in outer.non_trainable_variables]

    def restored(value):  # the moving statistics as they were before
        for variable, saved in zip(outer.non_trainable_variables, statistics):
            variable.assign(saved)
        return np.asarray(value)

    trained = restored(outer(x, training=True))
    matches = [
        mode
        for mode in (True, False)
        if np.allclose(restored(taps(x, True, mode)[0]), trained, rtol=1e-5, atol=1e-6)
    ]
    assert matches
    return matches[0]


@pytest.mark.parametrize("name, frozen", [("base/inner_relu", False), ("inner_relu", True)])
def test_a_margin_inside_a_nested_model_matches_the_reference(name, frozen):
    """By path or by its own (unique) name; also with the base frozen, where
    no trainable weight precedes the margin layer."""
    outer, taps = fine_tuning_net(frozen)
    margin = LargeMargin(["input", name], gamma=[0.3, 0.5], alpha=2.0, **TOP)
    model = MarginModel.wrap(outer, margin)
    x, y = digits(12)
    base_mode = keras_mode_of_the_base(outer, taps, tf.constant(x))
    for training in (False, True):
        outputs, activations = model.call_with_activations(tf.constant(x), training=training)
        expected_outputs, expected_relu = taps(
            tf.constant(x), training, base_mode if training else False
        )
        np.testing.assert_allclose(outputs, expected_outputs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(activations[name], expected_relu, rtol=1e-5, atol=1e-6)
    expected_loss, _ = reference.margin_loss(
        taps, x, y, gamma=list(margin.gamma), alpha=2.0, layers=["input", name]
    )
    nearest = reference.boundary_distances(taps, x, y, layers=["input", name])
    distances = model.margin_distances(x, y)
    for layer, expected in zip(["input", name], nearest):
        np.testing.assert_allclose(distances[layer], expected, rtol=1e-4, atol=1e-6)
    model.compile(keras.optimizers.SGD(0.1), loss=None)
    logs = model.evaluate(x, y, batch_size=12, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["margin_loss"], float(expected_loss), rtol=1e-5)
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.fit(x, y, batch_size=12, epochs=1, verbose=0)
    moved = [np.abs(w.numpy() - b).max() for w, b in zip(model.trainable_weights, before)]
    assert max(moved) > 0
    assert len(model.trainable_weights) == (4 if frozen else 8)


def test_a_missing_nested_layer_lists_the_valid_paths():
    outer, _ = fine_tuning_net(frozen=False)
    with pytest.raises(ValueError) as raised:
        MarginModel.wrap(outer, LargeMargin(["base/nope"]))
    message = str(raised.value)
    assert message.startswith("Margin layer(s) ['base/nope'] not found in model 'outer'.")
    for path in ("input", "base/inner_relu", "head", "head/head_dense"):
        assert repr(path) in message


def test_an_ambiguous_bare_name_asks_for_a_path():
    inputs = keras.Input((4,))
    towers = []
    for index in range(2):
        tower_in = keras.Input((4,))
        towers.append(
            keras.Model(
                tower_in, keras.layers.Dense(3, name="shared_name")(tower_in), name=f"t{index}"
            )
        )
    merged = keras.layers.Add()([tower(inputs) for tower in towers])
    outer = keras.Model(inputs, keras.layers.Dense(2)(merged))
    with pytest.raises(ValueError, match=r"^Margin layer 'shared_name' is ambiguous"):
        MarginModel.wrap(outer, LargeMargin(["shared_name"]))
    MarginModel.wrap(outer, LargeMargin(["t0/shared_name", "t1/shared_name"]))


# ------------------------------------------------------------ several inputs


def two_input_net():
    """A two-input model and a one-input model on the same layers, whose
    input is the two inputs side by side: the same function."""
    keras.utils.set_random_seed(0)
    concat = keras.layers.Concatenate(name="concat")
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")
    logits = keras.layers.Dense(4, name="logits")
    a, b = keras.Input((5,), name="a"), keras.Input((3,), name="b")
    margin = LargeMargin(["concat", "hidden"], **TOP)
    two = MarginModel({"a": a, "b": b}, logits(hidden(concat([a, b]))), margin=margin)
    joined = keras.Input((8,))
    one = MarginModel(
        joined, logits(hidden(joined)), margin=LargeMargin(["input", "hidden"], **TOP)
    )
    return two, one


def test_margin_distances_take_every_input_structure_fit_takes():
    two, one = two_input_net()
    rng = np.random.default_rng(0)
    xa, xb = rng.random((10, 5), "float32"), rng.random((10, 3), "float32")
    y = np.arange(10) % 4
    expected = one.margin_distances(np.concatenate([xa, xb], axis=1), y)
    dataset = tf.data.Dataset.from_tensor_slices(({"a": xa, "b": xb}, y)).batch(3)
    for given in (
        dict(x={"a": xa, "b": xb}, y=y, batch_size=4),
        dict(x=[xa, xb], y=y),
        dict(x=dataset),
    ):
        distances = two.margin_distances(**given)
        np.testing.assert_allclose(distances["concat"], expected["input"], rtol=1e-5)
        np.testing.assert_allclose(distances["hidden"], expected["hidden"], rtol=1e-5)
    two.compile("sgd", loss=CE)
    logs = two.evaluate({"a": xa, "b": xb}, y, return_dict=True, verbose=0)
    logged = one.margin_distances(np.concatenate([xa, xb], axis=1), y, competitors=1)
    np.testing.assert_allclose(logs["distance_concat"], logged["input"].mean(), rtol=1e-5)


# ------------------------------------------------------------- token inputs


def text_net(margin_layers):
    tokens = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(20, 4, name="embedding")(tokens)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    logits = keras.layers.Dense(3, name="logits")(pooled)
    margin = LargeMargin(margin_layers, **TOP)
    return MarginModel(tokens, logits, margin=margin), keras.Model(tokens, [logits, embedded])


def test_a_margin_on_token_inputs_is_refused_when_built_naming_the_embedding():
    with pytest.raises(TypeError) as raised:
        text_net(["input"])
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith("The margin on 'input' needs floating-point inputs")
    assert "Put the margin on the layer that embeds them: 'embedding'" in first_line
    assert "/ 255" not in first_line


def test_a_margin_on_the_embedding_matches_the_reference():
    keras.utils.set_random_seed(0)
    model, taps = text_net(["embedding"])
    x = np.random.default_rng(0).integers(0, 20, (8, 6)).astype("int32")
    y = np.arange(8) % 3
    nearest = reference.boundary_distances(taps, x, y, layers=["embedding"])
    np.testing.assert_allclose(model.margin_distances(x, y)["embedding"], nearest[0], rtol=1e-4)


# ------------------------------------------------------- unbatched datasets


def test_an_unbatched_dataset_is_refused_with_the_fix():
    inputs = keras.Input((8, 8, 1))
    model = MarginModel(
        inputs,
        keras.layers.Dense(10)(keras.layers.Flatten()(inputs)),
        margin=LargeMargin(["input"]),
    )
    model.compile("sgd", loss=CE)
    x, y = digits(6)
    weights = [w.numpy().copy() for w in model.weights]
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    for call in (
        lambda: model.fit(unbatched, verbose=0),
        lambda: model.margin_distances(unbatched),
    ):
        with pytest.raises(ValueError) as raised:
            call()
        first_line = str(raised.value).splitlines()[0]
        assert "received an unbatched tf.data.Dataset" in first_line
        assert "dataset.batch(32)" in first_line
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())


# -------------------------------------------------------- softmax outputs


@pytest.mark.parametrize("ending", ["dense softmax", "softmax layer", "nested softmax"])
def test_a_softmax_output_called_logits_warns(ending):
    inputs = keras.Input((4,))
    if ending == "dense softmax":
        outputs = keras.layers.Dense(3, activation="softmax")(inputs)
    elif ending == "softmax layer":
        outputs = keras.layers.Softmax()(keras.layers.Dense(3)(inputs))
    else:
        inner_in = keras.Input((4,))
        inner = keras.Model(inner_in, keras.layers.Dense(3, activation="softmax")(inner_in))
        outputs = inner(inputs)
    with pytest.warns(
        UserWarning, match=r"emits probabilities, not logits.*output='probabilities'"
    ):
        MarginModel(inputs, outputs, margin=LargeMargin(["input"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MarginModel(inputs, outputs, margin=LargeMargin(["input"]), output="probabilities")


def test_logits_do_not_warn():
    inputs = keras.Input((4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MarginModel(inputs, keras.layers.Dense(3)(inputs), margin=LargeMargin(["input"]))


# --------------------------------------------------- keras.applications


def test_mobilenet_v2_fine_tuning_end_to_end(tmp_path):
    """MobileNetV2 (alpha 0.35, batch norm) as a nested base: margins on the
    input and a layer inside the base; fit, `.keras` round trip, export."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(base(inputs))
    outer = keras.Model(inputs, keras.layers.Dense(10, name="logits")(pooled))
    inner = f"{base.name}/block_3_expand_relu"
    model = MarginModel.wrap(outer, LargeMargin(["input", inner]))
    # SGD: Adam's update of MobileNetV2's 158 variables takes TensorFlow
    # about 20 s more to trace, for a plain Keras model alike.
    model.compile(keras.optimizers.SGD(1e-3), loss=CE)
    images, y = digits(32)
    x = np.repeat(tf.image.resize(images, (32, 32)).numpy(), 3, axis=-1)
    moving = base.get_layer("block_3_expand_BN").moving_mean.numpy().copy()
    history = model.fit(
        x[:16], y[:16], batch_size=16, epochs=2, validation_data=(x[16:], y[16:]), verbose=0
    )
    assert np.all(np.isfinite(list(history.history["loss"])))
    # Distances are measured in inference mode only, so that those of the
    # training and the validation digits are of the same function.
    assert "distance_input" not in history.history
    trained = model.evaluate(x[:16], y[:16], return_dict=True, verbose=0)
    for layer in ("input", inner):
        validation = history.history[f"val_distance_{layer}"][-1]
        assert 0.5 < trained[f"distance_{layer}"] / validation < 2
    x = x[:16]
    # Training mode went through the base's batch norm, as plain Keras does.
    assert np.abs(base.get_layer("block_3_expand_BN").moving_mean.numpy() - moving).max() > 0
    loaded = assert_model_file_round_trip(model, tmp_path / "model.keras", x)
    archive = served(loaded, tmp_path / "exported")
    np.testing.assert_allclose(archive.serve(x), model.predict(x, verbose=0), atol=1e-5)
