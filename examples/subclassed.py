"""A subclassed MarginModel that exposes its hidden activations.

`call(..., return_activations=True)` returns `(logits, {name: activation})`,
which is all MarginModel needs to put the margin on hidden layers.

    python examples/subclassed.py [--epochs 15]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import marginfit  # noqa: E402


@keras.saving.register_keras_serializable(package="examples")
class DigitsNet(marginfit.MarginModel):
    def __init__(self, units=64, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.logits = keras.layers.Dense(10)

    def call(self, inputs, training=None, return_activations=False):
        hidden = self.hidden(self.flatten(inputs))
        logits = self.logits(hidden)
        return (logits, {"hidden": hidden}) if return_activations else logits

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = marginfit.load_digits()
    model = DigitsNet(margin=marginfit.LargeMargin(["input", "hidden"], gamma=10000.0))
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=2)
    logs = model.evaluate(x_test, y_test, return_dict=True, verbose=0)
    print(
        f"test accuracy {logs['accuracy']:.4f}, mean input distance "
        f"{logs['distance_input']:.4f}, hidden distance {logs['distance_hidden']:.4f}"
    )
    return logs


if __name__ == "__main__":
    main()
