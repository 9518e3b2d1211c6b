"""Loads a `MarginModel` saved on TensorFlow on JAX, trains it on, saves
it (`.keras` and `marginfit.save_model`, a SavedModel exported from JAX);
``python jax_saving_worker.py FOLDER`` reads ``FOLDER/tensorflow.keras``
and ``FOLDER/data.npz`` and writes ``FOLDER/jax.keras``, ``FOLDER/saved``
and ``FOLDER/jax.npz`` (`test_backends.py`)."""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

import marginfit  # noqa: E402


def main(folder):
    with np.load(os.path.join(folder, "data.npz")) as data:
        x, y = data["x"], data["y"]
    model = marginfit.load_model(os.path.join(folder, "tensorflow.keras"))
    loaded = model.predict(x, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    model.save(os.path.join(folder, "jax.keras"))
    marginfit.save_model(model, os.path.join(folder, "saved"))
    np.savez(
        os.path.join(folder, "jax.npz"),
        loaded=loaded,
        trained=model.predict(x, verbose=0),
        **{f"w{i}": w for i, w in enumerate(model.get_weights())},
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
