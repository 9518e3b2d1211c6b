"""Saves a MarginModel in one process and resumes it in another.

python saving_worker.py save DIR
    Trains a MarginModel with per-group optimizers (Adam and
    BacktrackingSGD) for 2 epochs, writing a `.keras` file, a
    `marginfit.save_model` directory, ModelCheckpoint files (`.keras`,
    `.weights.h5`) and a BackupAndRestore backup of a run interrupted
    after 2 epochs; then trains 2 more epochs and records the expected
    state in DIR/expected.npz. Does the same for a regression model made
    of our components (HuberLoss, BacktrackingSGD, Keras' L1 and
    LayerNormalization), and serializes a ViolationRate.
python saving_worker.py resume DIR
    In a fresh process, restores each of them, checks it against the
    record and trains it 2 more epochs; prints one JSON report.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
from helpers import CE, conv_net, digits

import marginfit

MARGIN = marginfit.LargeMargin(
    ["input", "conv", "dense"], gamma=[0.2, 0.15, 0.15], alpha=2.0, competitors="top"
)
EPOCHS = 2
FORMATS = ("keras", "save_model", "checkpoint_keras", "checkpoint_weights", "backup")


def data():
    return digits(96)


def fresh_model():
    """The model and its compile arguments, identical in every process."""
    model, _ = conv_net(MARGIN)
    optimizer = marginfit.discriminative_optimizer(
        model,
        [
            (keras.optimizers.Adam(3e-3, name="features"), ["conv"]),
            (marginfit.BacktrackingSGD(0.05, name="head"), ["dense", "logits"]),
        ],
    )
    model.compile(optimizer, loss=CE, metrics=["accuracy"])
    return model


def fit(model, epochs, callbacks=(), initial_epoch=0):
    x, y = data()
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


def state(model):
    x, y = data()
    return {
        "logs": model.evaluate(x, y, batch_size=32, return_dict=True, verbose=0),
        "predictions": model.predict(x, verbose=0),
        "optimizer": {v.path: v.numpy() for v in model.optimizer.variables},
        "weights": [w.numpy() for w in model.weights],
    }


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == EPOCHS:
            raise KeyboardInterrupt


def save(directory):
    model = fresh_model()
    fit(
        model,
        EPOCHS,
        callbacks=[
            keras.callbacks.ModelCheckpoint(os.path.join(directory, "checkpoint.keras")),
            keras.callbacks.ModelCheckpoint(
                os.path.join(directory, "checkpoint.weights.h5"), save_weights_only=True
            ),
        ],
    )
    model.save(os.path.join(directory, "model.keras"))
    marginfit.save_model(model, os.path.join(directory, "saved_model"))
    saved = state(model)
    fit(model, 2 * EPOCHS, initial_epoch=EPOCHS)
    continued = [w.numpy() for w in model.weights]

    interrupted = fresh_model()
    try:
        fit(
            interrupted,
            2 * EPOCHS,
            callbacks=[
                keras.callbacks.BackupAndRestore(os.path.join(directory, "backup")),
                Interrupt(),
            ],
        )
    except KeyboardInterrupt:
        pass
    np.savez(
        os.path.join(directory, "expected.npz"),
        predictions=saved["predictions"],
        **{f"weight_{i}": w for i, w in enumerate(continued)},
        **{f"optimizer/{path}": value for path, value in saved["optimizer"].items()},
    )
    with open(os.path.join(directory, "expected.json"), "w") as file:
        json.dump(
            {
                "logs": saved["logs"],
                "model_config": model.get_config(),
                "optimizer_config": model.optimizer.get_config(),
            },
            file,
        )
    save_components(directory)


def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    return x, (x @ np.array([1.0, -2.0, 3.0, 0.5], "float32") * 2.0)[:, None]


def components_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(16, kernel_regularizer=keras.regularizers.L1(0.01), name="hidden")(
        inputs
    )
    hidden = keras.layers.LayerNormalization(epsilon=1e-3, name="norm")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(hidden))
    model.compile(marginfit.BacktrackingSGD(0.05), loss=marginfit.HuberLoss(2.5))
    return model


def fit_regression(model, initial_epoch):
    x, y = regression_data()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=initial_epoch + EPOCHS,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
    )


def save_components(directory):
    model = components_model()
    fit_regression(model, 0)
    model.save(os.path.join(directory, "components.keras"))
    x, y = regression_data()
    loss = model.evaluate(x, y, verbose=0)
    slots = [v.numpy() for v in model.optimizer.variables]
    fit_regression(model, EPOCHS)
    np.savez(
        os.path.join(directory, "components.npz"),
        loss=loss,
        **{f"slot_{i}": v for i, v in enumerate(slots)},
        **{f"weight_{i}": w.numpy() for i, w in enumerate(model.weights)},
    )
    with open(os.path.join(directory, "violation_rate.json"), "w") as file:
        json.dump(keras.saving.serialize_keras_object(marginfit.ViolationRate([0.5, 2.0])), file)


def resume_components(directory):
    expected = np.load(os.path.join(directory, "components.npz"))
    model = keras.models.load_model(os.path.join(directory, "components.keras"), safe_mode=True)
    x, y = regression_data()
    loss = model.evaluate(x, y, verbose=0)
    slots = [v.numpy() for v in model.optimizer.variables]
    fit_regression(model, EPOCHS)
    with open(os.path.join(directory, "violation_rate.json")) as file:
        rate = keras.saving.deserialize_keras_object(json.load(file))
    rate.update_state([[0.4, 3.0], [0.6, 1.0], [0.6, 3.0]], sample_weight=[1.0, 2.0, 4.0])
    return {
        "loss_class": type(model.loss).__name__,
        "threshold": model.loss.threshold,
        "l1": model.get_layer("hidden").kernel_regularizer.get_config(),
        "norm_epsilon": model.get_layer("norm").epsilon,
        "optimizer_class": type(model.optimizer).__name__,
        "loss_difference": abs(float(loss) - float(expected["loss"])),
        "slot_difference": max_difference(
            slots, [expected[f"slot_{i}"] for i in range(len(slots))]
        ),
        "slot_count": len(slots),
        "resumed_weight_difference": max_difference(
            [w.numpy() for w in model.weights],
            [expected[f"weight_{i}"] for i in range(len(model.weights))],
        ),
        "violation_rate_class": type(rate).__name__,
        "violation_rate_gamma": list(rate.gamma),
        "violation_rate": float(rate.result()),
    }


def restore(directory, kind):
    """The model restored from ``kind`` of saved state, in this process."""
    if kind == "keras":
        return keras.models.load_model(os.path.join(directory, "model.keras"), safe_mode=True)
    if kind == "save_model":
        return marginfit.load_model(os.path.join(directory, "saved_model"))
    if kind == "checkpoint_keras":
        return keras.models.load_model(os.path.join(directory, "checkpoint.keras"))
    model = fresh_model()
    if kind == "checkpoint_weights":
        model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(directory, "checkpoint.weights.h5"))
    return model


def max_difference(first, second):
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(first, second))


def resume(directory):
    expected = np.load(os.path.join(directory, "expected.npz"))
    with open(os.path.join(directory, "expected.json")) as file:
        recorded = json.load(file)
    report = {}
    for kind in FORMATS:
        model = restore(directory, kind)
        entry = {
            "class": type(model).__name__,
            "is_margin_model": isinstance(model, marginfit.MarginModel),
            "margin_config": model.margin.get_config(),
            "optimizer_class": type(model.optimizer).__name__,
            "sub_optimizers": [
                [type(opt).__name__, opt.name, int(opt.iterations)]
                for opt in model.optimizer.optimizers
            ],
        }
        if kind == "backup":
            recorder = EpochRecorder()
            fit(
                model,
                2 * EPOCHS,
                callbacks=[
                    keras.callbacks.BackupAndRestore(os.path.join(directory, "backup")),
                    recorder,
                ],
            )
            entry["epochs_run"] = recorder.epochs
        else:
            current = state(model)
            entry["logs"] = current["logs"]
            entry["same_model_config"] = (
                json.loads(json.dumps(model.get_config())) == recorded["model_config"]
            )
            entry["same_optimizer_config"] = (
                json.loads(json.dumps(model.optimizer.get_config())) == recorded["optimizer_config"]
            )
            entry["prediction_difference"] = max_difference(
                [current["predictions"]], [expected["predictions"]]
            )
            paths = sorted(current["optimizer"])
            entry["optimizer_paths_match"] = paths == sorted(
                key[len("optimizer/") :] for key in expected.files if key.startswith("optimizer/")
            )
            entry["optimizer_state_difference"] = max_difference(
                [current["optimizer"][p] for p in paths],
                [expected[f"optimizer/{p}"] for p in paths],
            )
            fit(model, 2 * EPOCHS, initial_epoch=EPOCHS)
        entry["resumed_weight_difference"] = max_difference(
            [w.numpy() for w in model.weights],
            [expected[f"weight_{i}"] for i in range(len(model.weights))],
        )
        if kind == "save_model":
            x, _ = data()
            served = tf.saved_model.load(os.path.join(directory, "saved_model"))
            signature = served.signatures["serving_default"]
            (output,) = signature(tf.constant(x)).values()
            layer = keras.layers.TFSMLayer(
                os.path.join(directory, "saved_model"), call_endpoint="serve"
            )
            entry["serve_difference"] = max_difference(
                [served.serve(x), output, layer(x)], [expected["predictions"]] * 3
            )
        report[kind] = entry
    report["recorded_logs"] = recorded["logs"]
    report["margin_config"] = MARGIN.get_config()
    report["components"] = resume_components(directory)
    print(json.dumps(report))


if __name__ == "__main__":
    command, directory = sys.argv[1:3]
    {"save": save, "resume": resume}[command](directory)
