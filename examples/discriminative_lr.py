"""Discriminative learning rates: one optimizer per layer group.

The convolutional features learn with Adam at 2e-3, the dense head with
Nadam at 5e-4, both halved every 5 epochs with their ratio kept.

    python examples/discriminative_lr.py [--epochs 15]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import marginfit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = marginfit.load_digits()
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D()(x))
    x = keras.layers.Dense(64, activation="relu", name="dense")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    model = marginfit.MarginModel(
        inputs, logits, margin=marginfit.LargeMargin(["input", "dense"], gamma=10000.0)
    )
    optimizer = marginfit.discriminative_optimizer(
        model,
        [
            (keras.optimizers.Adam(2e-3, name="features"), ["conv1", "conv2"]),
            (keras.optimizers.Nadam(5e-4, name="head"), ["dense", "logits"]),
        ],
    )
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=64,
        verbose=2,
        callbacks=[marginfit.GroupLearningRateScheduler(lambda epoch: 0.5 ** (epoch // 5))],
    )
    logs = model.evaluate(x_test, y_test, return_dict=True, verbose=0)
    rates = {name: history.history[f"learning_rate_{name}"][-1] for name in ("features", "head")}
    print(f"test accuracy {logs['accuracy']:.4f}; final rates {rates}")
    return {**logs, "rates": rates}


if __name__ == "__main__":
    main()
