"""Large-margin training of a small CNN on the bundled digits, in plain fit().

python examples/quickstart.py [--epochs 15] [--approximate | --exact]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import marginfit  # noqa: E402


def build_model(margin):
    inputs = keras.Input((8, 8, 1), name="pixels")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu", name="dense")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    return marginfit.MarginModel(inputs, logits, margin=margin)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--exact", action="store_true", help="differentiate through the gradient norm"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = marginfit.load_digits()
    margin = marginfit.LargeMargin(
        ["input", "pool", "dense"], gamma=10000.0, alpha=4.0, approximate=not args.exact
    )
    model = build_model(margin)
    model.compile(
        keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        y_train,
        validation_split=0.1,
        epochs=args.epochs,
        batch_size=args.batch_size,
        verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_margin_loss", patience=5, restore_best_weights=True
            )
        ],
    )
    logs = model.evaluate(x_test, y_test, return_dict=True, verbose=0)
    print("\ntest results")
    for name, value in sorted(logs.items()):
        print(f"  {name:>16s}  {value:.4f}")
    return logs


if __name__ == "__main__":
    main()
