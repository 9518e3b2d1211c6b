"""Functional MarginModel in fit() with the usual callbacks.

EarlyStopping and ModelCheckpoint monitor `val_margin_loss` (no `mode=`
needed), CSVLogger and TensorBoard record every margin metric.

    python examples/functional_callbacks.py [--epochs 20] [--output runs/functional]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import marginfit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--output", default="runs/functional")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    (x_train, y_train), (x_test, y_test) = marginfit.load_digits()
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    model = marginfit.MarginModel(
        inputs, logits, margin=marginfit.LargeMargin(["input", "conv", "hidden"], gamma=10000.0)
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    best = os.path.join(args.output, "best.keras")
    model.fit(
        x_train,
        y_train,
        validation_split=0.1,
        epochs=args.epochs,
        verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_margin_loss", patience=5, restore_best_weights=True
            ),
            keras.callbacks.ModelCheckpoint(best, monitor="val_margin_loss", save_best_only=True),
            keras.callbacks.CSVLogger(os.path.join(args.output, "history.csv")),
            keras.callbacks.TensorBoard(os.path.join(args.output, "tensorboard")),
        ],
    )
    logs = model.evaluate(x_test, y_test, return_dict=True, verbose=0)
    print(
        f"test accuracy {logs['accuracy']:.4f}, margin loss {logs['margin_loss']:.1f}; "
        f"best model in {best}"
    )
    return logs


if __name__ == "__main__":
    main()
