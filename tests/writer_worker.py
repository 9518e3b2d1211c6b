"""Writes every marginfit artefact to DIR over and over, until killed.

python writer_worker.py DIR TAG

Two small models ("a" and "b", different weights) take turns. Each round
writes, for the current model: a `marginfit.save_model` directory
(DIR/saved), a `.keras` file (DIR/model.keras), a JSON summary
(DIR/summary.json) and the tuning results (DIR/results.json, .csv), each
with the writers the library uses. Once its models are built it prints
"ready" and waits for a line on stdin (so that a test can start the next
writer while it checks the last one's files); then it records each model's
weights in DIR/expected_<name>.npz, and prints one line per round.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from helpers import CE, conv_net  # noqa: E402

import marginfit  # noqa: E402
from marginfit import files  # noqa: E402
from marginfit.tuning import search  # noqa: E402

MARGIN = marginfit.LargeMargin(["input", "dense"], gamma=0.2, alpha=2.0)


def models():
    built = {}
    for seed, name in enumerate("ab"):
        model, _ = conv_net(MARGIN, seed=seed)
        model.compile("adam", loss=CE)
        built[name] = model
    return built


def write_round(directory, name, model, tag, round_number):
    marginfit.save_model(model, os.path.join(directory, "saved"))
    with files.atomic_path(os.path.join(directory, "model.keras")) as temporary:
        model.save(temporary)
    record = {"model": name, "writer": tag, "round": round_number, "padding": "x" * 100_000}
    files.write_text(os.path.join(directory, "summary.json"), json.dumps(record))
    rows = [{"trial": str(i), "model": name, "score": float(i)} for i in range(2000)]
    search.write_results(rows, directory)


def main(directory, tag):
    built = models()
    print("ready", flush=True)
    sys.stdin.readline()
    for name, model in built.items():
        with files.atomic_path(os.path.join(directory, f"expected_{name}.npz")) as temporary:
            with open(temporary, "wb") as file:
                np.savez(file, *model.get_weights())
    round_number = 0
    while True:
        name = "ab"[round_number % 2]
        write_round(directory, name, built[name], tag, round_number)
        print(f"round {round_number}", flush=True)
        round_number += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
