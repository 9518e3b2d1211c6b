"""A keras-tuner search over gamma, architecture and learning rates.

python examples/tuning_search.py [--trials 6] [--epochs 4] [--output runs/tuning]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras_tuner  # noqa: E402

import marginfit  # noqa: E402
from marginfit import tuning  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--output", default="runs/tuning")
    args = parser.parse_args(argv)

    (x_train, y_train), (x_val, y_val) = marginfit.load_digits()
    hypermodel = tuning.MarginHyperModel(input_shape=(8, 8, 1), num_classes=10)
    # Narrow the space the hypermodel declares, keras-tuner's way.
    hp = keras_tuner.HyperParameters()
    hp.Choice("dense_units", [32, 64])
    hp.Float("gamma", 1e-2, 1e4, sampling="log")
    tuner = keras_tuner.RandomSearch(
        hypermodel,
        hyperparameters=hp,
        objective=tuning.objective("val_margin_loss"),
        max_trials=args.trials,
        directory=args.output,
        project_name="digits",
        overwrite=True,
        seed=0,
    )
    tuner.search(x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs, verbose=0)
    rows = tuning.results(tuner)
    print(tuning.format_table(rows, "val_margin_loss"))
    best = tuning.best_model(tuner)
    logs = best.evaluate(x_val, y_val, return_dict=True, verbose=0)
    print(
        f"best trial {rows[0]['trial']}: val_margin_loss {logs['margin_loss']:.4f}, "
        f"val_accuracy {logs['accuracy']:.4f}"
    )
    return {"rows": rows, **logs}


if __name__ == "__main__":
    main()
