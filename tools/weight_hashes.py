"""Hashes of the weights that TensorFlow trains with the authors' loss (the
top-scoring competitors, no class-balance term) and the other margins whose
training draws nothing, for checking that a refactoring keeps TensorFlow's
training bit-identical: run it on both checkouts and compare.

    python tools/weight_hashes.py > before.json   # on the old checkout
    python tools/weight_hashes.py > after.json    # on the new one
    diff before.json after.json

Each case trains tests/nets.conv_net for 2 epochs of Adam on 64 digits
(every norm, approximate and exact, top_k 1 and 3, max and sum, logit
space, layer weights, the balance term, batch norm in both couplings,
probability outputs), and the authors' preset for one epoch.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from nets import conv_net, digits, margin_for  # noqa: E402


def digest(model):
    """The first 16 hex digits of the SHA-256 of every weight's bytes."""
    hashed = hashlib.sha256()
    for weight in model.get_weights():
        hashed.update(np.ascontiguousarray(weight).tobytes())
    return hashed.hexdigest()[:16]


def cases():
    """``{name: (margin options, conv_net options)}``."""
    found = {}
    for norm in (1, 2, np.inf):
        for approximate in (True, False):
            for top_k, aggregation in ((1, "max"), (3, "max"), (3, "sum")):
                name = f"norm={norm} approx={approximate} top_k={top_k} {aggregation}"
                options = dict(
                    norm=norm, approximate=approximate, top_k=top_k, aggregation=aggregation
                )
                found[name] = (options, {})
    found["logits space"] = (dict(norm=2, space="logits", top_k=2), {})
    found["weights"] = (dict(norm=2, layer_weights=[0.5, 2.0, 1.5], top_k=2), {})
    found["top balance"] = (dict(norm=2, balance=1.0), {})
    found["batchnorm inference"] = (dict(norm=2, coupling="inference"), dict(batchnorm=True))
    found["batchnorm batch exact"] = (dict(norm=2, approximate=False), dict(batchnorm=True))
    found["probabilities"] = (dict(norm=2, top_k=2), dict(output="probabilities"))
    return found


def authors_preset():
    """The authors' preset, built as `marginfit train --preset authors` builds
    it (on checkouts before `marginfit.experiments`, through `cli`)."""
    try:
        from marginfit.experiments import Experiment
    except ImportError:
        from marginfit import cli

        args = cli.parse_args(["train", "--preset", "authors", "--batch-size", "64"])
        (x, y), _ = cli.load("digits", 0.0, 0)
        return cli.build(args, x.shape[1:], 10, num_examples=len(x))[0], x, y
    experiment = Experiment.preset("authors", epochs=1, batch_size=64)
    (x, y), _ = experiment.load()
    return experiment.build(x.shape[1:], 10, num_examples=len(x))[0], x, y


def main():
    x, y = digits(64)
    hashes = {}
    for name, (margin_options, net_options) in cases().items():
        model, _ = conv_net(margin_for(**margin_options), **net_options)
        logits = net_options.get("output") != "probabilities"
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
        model.compile(keras.optimizers.Adam(1e-2), loss=loss)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        hashes[name] = digest(model)
    model, x_train, y_train = authors_preset()
    model.fit(x_train[:256], y_train[:256], batch_size=64, epochs=1, shuffle=False, verbose=0)
    hashes["authors preset"] = digest(model)
    json.dump(hashes, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
