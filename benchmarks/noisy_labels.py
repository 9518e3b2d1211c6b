"""Noisy-label robustness: margin vs cross-entropy on the bundled digits.

Trains the `marginfit train` network with plain cross-entropy and with the
margin (its defaults, the authors' settings: the margin loss alone, gamma
10000, alpha 4, L2, margin on the input and every hidden layer, Adam 1e-3,
batch 64) for each label-noise rate and
seed, and prints the mean (and spread) clean test accuracy per setting, as a
table and a JSON line.

    python benchmarks/noisy_labels.py [--noise 0,0.4] [--seeds 3] [--epochs 60]
"""

import argparse
import json
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from marginfit import cli, data  # noqa: E402


def accuracy(noise, seed, with_margin, epochs, extra):
    args = cli.parser().parse_args(
        ["train", "--label-noise", str(noise), "--seed", str(seed), "--epochs", str(epochs), *extra]
    )
    (x_train, y_train), (x_test, y_test) = cli.load(args.data, args.label_noise, args.seed)
    classes = data.num_classes(y_train, y_test)
    model, _ = cli.build(args, x_train.shape[1:], classes, with_margin)
    model.fit(x_train, y_train, epochs=epochs, batch_size=args.batch_size, verbose=0)
    return model.evaluate(x_test, y_test, return_dict=True, verbose=0)["accuracy"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", default="0,0.4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("extra", nargs="*", help="further `marginfit train` options, after --")
    args = parser.parse_args(argv)
    table = {}
    print(f"{'label noise':>11} {'model':>14} {'mean acc':>9} {'min':>6} {'max':>6}")
    for noise in [float(n) for n in args.noise.split(",")]:
        for name, with_margin in (("cross-entropy", False), ("margin", True)):
            values = [
                accuracy(noise, seed, with_margin, args.epochs, args.extra)
                for seed in range(args.seeds)
            ]
            table[f"{noise:g} {name}"] = values
            print(
                f"{noise:>11.0%} {name:>14} {statistics.mean(values):>9.4f} "
                f"{min(values):>6.3f} {max(values):>6.3f}",
                flush=True,
            )
    print(json.dumps({"epochs": args.epochs, "accuracies": table}))


if __name__ == "__main__":
    main()
