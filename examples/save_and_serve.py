"""Save, reload and resume; export a SavedModel and serve it.

python examples/save_and_serve.py [--epochs 5] [--output runs/serving]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import marginfit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--output", default="runs/serving")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    (x_train, y_train), (x_test, y_test) = marginfit.load_digits()
    inputs = keras.Input((8, 8, 1), name="pixels")
    hidden = keras.layers.Dense(64, activation="relu", name="hidden")(
        keras.layers.Flatten()(inputs)
    )
    logits = keras.layers.Dense(10, name="logits")(hidden)
    model = marginfit.MarginModel(inputs, logits, margin=marginfit.LargeMargin(["input", "hidden"]))
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    model.fit(x_train, y_train, epochs=args.epochs, verbose=0)

    # 1. A .keras file: the MarginModel, its margin, compile config and optimizer state.
    path = os.path.join(args.output, "digits.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    reloaded.fit(x_train, y_train, epochs=1, verbose=0)  # resumes training

    # 2. A SavedModel for TF Serving, plus the training state: marginfit.save_model.
    directory = os.path.join(args.output, "saved_model")
    marginfit.save_model(model, directory)
    served = tf.saved_model.load(directory)
    (served_logits,) = served.signatures["serving_default"](pixels=tf.constant(x_test)).values()
    layer = keras.layers.TFSMLayer(directory, call_endpoint="serve")
    expected = model.predict(x_test, verbose=0)
    difference = max(
        float(np.abs(served_logits.numpy() - expected).max()),
        float(np.abs(layer(x_test).numpy() - expected).max()),
    )
    restored = marginfit.load_model(directory)  # trainable again
    logs = restored.evaluate(x_test, y_test, return_dict=True, verbose=0)
    print(
        f"served predictions match the model to {difference:.1e}; restored "
        f"{type(restored).__name__} test accuracy {logs['accuracy']:.4f}"
    )
    return {"serving_difference": difference, **logs}


if __name__ == "__main__":
    main()
