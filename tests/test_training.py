"""MarginModel inside fit(): batch-coupling layers, callbacks, distribution."""

import csv
import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import reference
import rounding
import tensorflow as tf
from helpers import CE, conv_net, digits

import marginfit
from marginfit import LargeMargin

HERE = os.path.dirname(__file__)
# In the order of the reference taps: [outputs, conv, dense].
LAYERS = ["input", "conv", "dense"]


def first_step_margin_loss(margin, x, y, batchnorm=True):
    """margin_loss logged by the first training step, and the reference
    model on the initial weights."""
    model, _ = conv_net(margin, batchnorm=batchnorm)
    model.compile(keras.optimizers.SGD(0.0), loss=CE)
    history = model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    _, initial_taps = conv_net(margin, batchnorm=batchnorm)
    return history.history["margin_loss"][0], initial_taps


def test_inference_coupling_uses_each_examples_own_gradient():
    x, y = digits(8)
    margin = LargeMargin(
        LAYERS,
        gamma=0.2,
        alpha=2.0,
        top_k=2,
        coupling="inference",
        competitors="top",
        balance=0.0,
    )
    logged, taps = first_step_margin_loss(margin, x, y)
    expected, _ = reference.margin_loss(
        taps,
        x,
        y,
        gamma=0.2,
        alpha=2.0,
        layers=LAYERS,
        top_k=2,
        training=False,
    )
    np.testing.assert_allclose(logged, float(expected), rtol=1e-5)


def test_batch_coupling_is_the_authors_batch_summed_gradient():
    x, y = digits(8)
    gamma, alpha = 0.2, 2.0
    margin = LargeMargin(
        LAYERS, gamma=gamma, alpha=alpha, coupling="batch", competitors="top", balance=0.0
    )
    logged, taps = first_step_margin_loss(margin, x, y)
    coupled, own = reference.batch_coupled_distances(taps, x, y, layers=LAYERS)

    def loss(distances):
        terms = [
            np.maximum(0, gamma - np.maximum(d[0], gamma * (1 - alpha))) - gamma for d in distances
        ]
        return np.mean(terms)

    np.testing.assert_allclose(logged, loss(coupled), rtol=1e-5)
    # With BatchNormalization in training mode the batch-summed gradient is
    # not each example's own: the two estimates differ by far more than 1 %.
    relative = np.abs(coupled[0][0] - own[0][0]) / np.abs(own[0][0])
    assert relative.max() > 0.01


def test_without_coupling_layers_batch_gradient_is_exact():
    x, y = digits(8)
    margin = LargeMargin(
        LAYERS, gamma=0.2, alpha=2.0, coupling="batch", competitors="top", balance=0.0
    )
    logged, taps = first_step_margin_loss(margin, x, y, batchnorm=False)
    expected, _ = reference.margin_loss(
        taps, x, y, gamma=0.2, alpha=2.0, layers=LAYERS, training=True
    )
    np.testing.assert_allclose(logged, float(expected), rtol=1e-5)


def test_callbacks_monitor_margin_metrics_without_mode(tmp_path):
    # In logit space, where gamma is a distance and the violation rate is logged.
    margin = LargeMargin(["input", "conv", "dense"], gamma=0.2, alpha=2.0, space="logits")
    model, _ = conv_net(margin)
    model.compile("adam", loss=CE, metrics=["accuracy"])
    x, y = digits(64)
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_margin_loss", patience=10),
        keras.callbacks.ReduceLROnPlateau(monitor="val_distance_dense", patience=10),
        keras.callbacks.ModelCheckpoint(
            str(tmp_path / "best.keras"), monitor="val_margin_loss", save_best_only=True
        ),
        keras.callbacks.EarlyStopping(monitor="val_violation_rate", patience=10),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.TensorBoard(str(tmp_path / "tensorboard")),
    ]
    history = model.fit(
        x[:48],
        y[:48],
        validation_data=(x[48:], y[48:]),
        epochs=3,
        batch_size=16,
        callbacks=callbacks,
        verbose=0,
    )
    # Losses are minimised, distances to the boundary maximised.
    assert callbacks[0].monitor_op is keras.ops.less
    assert callbacks[1].monitor_op is keras.ops.greater
    assert callbacks[2].monitor_op is keras.ops.less
    assert callbacks[3].monitor_op is keras.ops.less
    both = {"loss", "ce_loss", "margin_loss", "dead_rate", "accuracy"}
    distances = {"violation_rate"} | {f"distance_{name}" for name in ("input", "conv", "dense")}
    # Only training updates weights, so only it counts non-finite steps;
    # only evaluation (inference mode) measures distances.
    assert set(history.history) == both | {f"val_{name}" for name in both | distances} | {
        "learning_rate",
        "nonfinite_steps",
    }
    with open(tmp_path / "log.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3
    for key in ("val_margin_loss", "val_distance_input", "ce_loss"):
        np.testing.assert_allclose(
            [float(row[key]) for row in rows], history.history[key], rtol=1e-6
        )
    best = int(np.argmin(history.history["val_margin_loss"]))
    reloaded = keras.models.load_model(tmp_path / "best.keras")
    logs = reloaded.evaluate(x[48:], y[48:], batch_size=16, return_dict=True, verbose=0)
    np.testing.assert_allclose(
        logs["margin_loss"], history.history["val_margin_loss"][best], rtol=1e-5
    )
    assert os.listdir(tmp_path / "tensorboard")


@pytest.fixture(scope="module")
def mirrored_report():
    """Two logical CPUs need a fresh process: devices are fixed at start-up."""
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed_fit.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("margin", ["defaults", "authors", "defaults+sam"])
def test_mirrored_strategy_matches_one_device(mirrored_report, margin):
    """The same global batches on one device and on two replicas train the
    same weights and logs, up to the order of their sums (float64 runs,
    bounds in `rounding`), with the library's defaults (whose balance term
    and sampled competitors are functions of the global batch), with the
    authors' loss, and with the defaults and `marginfit.SAM` (its replicas
    perturb with the global batch's gradient)."""
    assert mirrored_report["replicas"] == 2
    report = mirrored_report["margins"][margin]
    # The margin moved the weights: the check is not vacuous.
    assert report["max_weight_change"] > 1e-2
    rounding.assert_same_weights(report["weights"], report["single_weights"])
    # (Distances are logged in evaluation, which the multi-worker test checks.)
    rounding.assert_same_logs(report["mirrored"], report["single"], batch=16)


def test_a_nonfinite_replica_skips_the_update_on_every_replica(mirrored_report):
    """A NaN in one replica's share of a batch skips the update on both, and
    every log counts that one step once: the epoch's and each batch's (the
    second batch was the bad one)."""
    assert mirrored_report["poisoned_nonfinite_steps"] == 1
    assert mirrored_report["poisoned_batch_nonfinite_steps"] == [0, 1, 1, 1]
    assert mirrored_report["poisoned_max_difference"] == 0.0


def test_distance_histograms_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    margin = LargeMargin(["input", "dense"], gamma=0.2, alpha=2.0)
    model, _ = conv_net(margin)
    model.compile("adam", loss=CE)
    x, y = digits(48)
    histograms = marginfit.DistanceHistograms(tmp_path, (x[32:], y[32:]), every=2)
    model.fit(x[:32], y[:32], epochs=3, batch_size=16, callbacks=[histograms], verbose=0)
    events = event_accumulator.EventAccumulator(
        str(tmp_path / "validation"), size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    assert sorted(events.Tags()["tensors"]) == ["distance/dense", "distance/input"]
    written = events.Tensors("distance/input")
    # Every 2 epochs, and after the last: epochs 1 and 2 (0-based).
    assert [event.step for event in written] == [1, 2]
    # The last histogram holds the final model's distances: count and range.
    buckets = tf.make_ndarray(written[-1].tensor_proto)  # [bucket, (left, right, count)]
    expected = model.margin_distances(x[32:], y[32:])["input"]
    assert buckets[:, 2].sum() == len(expected)
    np.testing.assert_allclose(
        [buckets[0, 0], buckets[-1, 1]], [expected.min(), expected.max()], rtol=1e-5
    )


def test_distance_histograms_need_a_margin(tmp_path):
    model, _ = conv_net(None)
    model.compile("adam", loss=CE)
    x, y = digits(8)
    with pytest.raises(ValueError, match="needs a MarginModel with a margin"):
        model.fit(x, y, callbacks=[marginfit.DistanceHistograms(tmp_path, (x, y))], verbose=0)
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        marginfit.DistanceHistograms(tmp_path, (x, y), every=0)


def dead_relu_net():
    """ReLUs that never fire: the outputs are constant and the input gets no
    gradient."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(
        16, activation="relu", bias_initializer=keras.initializers.Constant(-100.0), name="dead"
    )(keras.layers.Flatten()(inputs))
    outputs = keras.layers.Dense(10, name="logits")(hidden)
    return marginfit.MarginModel(inputs, outputs, margin=LargeMargin(["input"], gamma=0.2))


def test_dead_examples_are_counted_and_warned_about_once_per_fit():
    model = dead_relu_net()
    model.compile(keras.optimizers.SGD(0.0), loss=None)  # it stays dead
    x, y = digits(32)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
        dead = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(dead) == 1 and "100% of the examples are dead" in str(dead[0].message)
        assert history.history["dead_rate"] == [1.0, 1.0, 1.0]
    assert model.evaluate(x, y, return_dict=True, verbose=0)["dead_rate"] == 1.0


def test_a_healthy_network_has_no_dead_examples():
    model, _ = conv_net(LargeMargin(LAYERS, gamma=0.2, alpha=2.0))
    model.compile("adam", loss=CE)
    x, y = digits(32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert history.history["dead_rate"] == [0.0, 0.0]


def test_inference_coupling_draws_fresh_sampled_competitors():
    # Without coupling layers the inference pass equals the training pass,
    # so with frozen weights only the draws can change the loss.
    x, y = digits(16)
    margin = LargeMargin(LAYERS, gamma=0.2, alpha=2.0, coupling="inference")
    assert margin.competitors == "sampled"
    model, _ = conv_net(margin)
    model.compile(keras.optimizers.SGD(0.0), loss=None)
    losses = {model.fit(x, y, batch_size=16, verbose=0).history["margin_loss"][0] for _ in range(4)}
    assert len(losses) > 1
    # Evaluation draws with a fixed seed: it repeats.
    assert len({model.evaluate(x, y, verbose=0)[0] for _ in range(3)}) == 1
