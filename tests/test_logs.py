"""What a person reads: the progress bar and `marginfit train`'s table show
what is informative, the loss is minus a clipped distance, and a monitored
log that the model never writes fails before training, naming the fix."""

import re

import keras
import numpy as np
import pytest
from helpers import CE, LAYERS, conv_net, digits

import marginfit
from marginfit import logs, tuning

X, Y = digits(48)


def progress_bar_of(model, **fit):
    """The epoch's last progress-bar line of a one-epoch fit, and History."""
    captured = []
    original = keras.utils.Progbar.update

    def update(progbar, current, values=None, finalize=None):
        if finalize:
            captured.append(dict(values or []))
        return original(progbar, current, values, finalize)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.utils.Progbar, "update", update)
        history = model.fit(X, Y, epochs=1, batch_size=16, verbose=1, **fit)
    return captured[-1], history.history


def test_the_margin_alone_shows_its_loss_once_and_no_always_zero_count():
    model, _ = conv_net(marginfit.LargeMargin(LAYERS))
    model.compile("adam", metrics=["accuracy"])
    shown, history = progress_bar_of(model, validation_data=(X, Y))
    assert set(shown) == {
        "accuracy", "loss", "val_accuracy", "val_loss",
        *(f"val_distance_{layer}" for layer in LAYERS),
    }  # fmt: skip
    # History keeps every log but ce_loss, which has nothing to report.
    assert {"margin_loss", "dead_rate", "nonfinite_steps", "val_dead_rate"} <= set(history)
    assert not {"ce_loss", "val_ce_loss"} & set(history)
    np.testing.assert_allclose(history["loss"], history["margin_loss"], rtol=1e-6)


def test_a_compiled_loss_shows_both_parts_and_a_nonzero_count_appears():
    model, _ = conv_net(marginfit.LargeMargin(LAYERS))
    model.compile("adam", CE)
    shown = logs.shown(model, {"loss": 1.0, "ce_loss": 2.0, "margin_loss": -1.0, "dead_rate": 0.0})
    assert shown == {"loss": 1.0, "ce_loss": 2.0, "margin_loss": -1.0}
    assert logs.shown(model, {"loss": 1.0, "dead_rate": 0.25, "nonfinite_steps": 1.0}) == {
        "loss": 1.0, "dead_rate": 0.25, "nonfinite_steps": 1.0,
    }  # fmt: skip
    shown, history = progress_bar_of(model)
    assert {"ce_loss", "margin_loss"} <= set(shown) and "dead_rate" not in shown
    assert "ce_loss" in history


def test_the_loss_is_minus_the_clipped_distance_on_a_linear_model():
    """On a linear model the logit-space distance is exact: the loss is
    minus the mean of the distances clipped to [gamma(1 - alpha), gamma]."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    logits = keras.layers.Dense(3, name="logits")(inputs)
    gamma, alpha = 0.3, 2.0
    margin = marginfit.LargeMargin(
        ["input"], gamma=gamma, alpha=alpha, space="logits", competitors="top", balance=0.0
    )
    model = marginfit.MarginModel(inputs, logits, margin=margin)
    model.compile("sgd")
    x = np.random.RandomState(1).normal(size=(64, 5)).astype("float32")
    y = np.random.RandomState(2).randint(0, 3, 64)
    kernel, bias = (w.astype("float64") for w in model.get_layer("logits").get_weights())
    scores = x.astype("float64") @ kernel + bias
    rows = np.arange(len(x))
    others = np.where(np.eye(3)[y] > 0, -np.inf, scores)
    rival = np.argmax(others, axis=1)
    distance = (scores[rows, y] - scores[rows, rival]) / np.linalg.norm(
        kernel[:, y] - kernel[:, rival], axis=0
    )
    expected = -np.mean(np.clip(distance, gamma * (1 - alpha), gamma))
    logged = model.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    np.testing.assert_allclose(logged["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(logged["margin_loss"], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "callback, message",
    [
        (keras.callbacks.EarlyStopping(monitor="val_violation_rate"), "space='logits'"),
        (keras.callbacks.ReduceLROnPlateau(monitor="distance_input"), "'val_distance_input'"),
        (keras.callbacks.EarlyStopping(monitor="val_distance_logits"), "add 'logits'"),
        (keras.callbacks.EarlyStopping(monitor="ce_loss"), "compile() with a loss"),
    ],
)
def test_a_monitored_log_the_model_never_writes_fails_before_training(callback, message):
    model, _ = conv_net(marginfit.LargeMargin(LAYERS))
    model.compile("adam")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        model.fit(X, Y, epochs=1, validation_data=(X, Y), callbacks=[callback], verbose=0)
    first_line = str(raised.value).splitlines()[0]
    assert f"monitor={callback.monitor!r}" in first_line and message in first_line
    assert "val_distance_conv" in str(raised.value)  # the logs that exist
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_monitored_logs_that_exist_pass():
    model, _ = conv_net(marginfit.LargeMargin(LAYERS, space="logits", gamma=0.1))
    model.compile("adam", CE, metrics=["accuracy"])
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=name)
        for name in ("val_violation_rate", "val_distance_conv", "ce_loss", "val_accuracy")
    ]
    history = model.fit(X, Y, epochs=1, validation_data=(X, Y), callbacks=callbacks, verbose=0)
    assert {"val_violation_rate", "val_distance_conv", "ce_loss"} <= set(history.history)


def test_a_tuner_objective_the_models_never_log_fails_before_any_trial(tmp_path):
    hypermodel = tuning.MarginHyperModel(input_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(ValueError, match=re.escape("space='logits'")):
        tuning.make_tuner("random", hypermodel, "val_violation_rate", str(tmp_path))
    assert not any(tmp_path.iterdir())
