"""The cluster a job runs in, from ``TF_CONFIG``: which distribution
strategy to train under and which task writes the outputs.

TensorFlow's multi-worker training reads ``TF_CONFIG`` (set by cloud
launchers, or by hand), e.g. for worker 0 of two on one host::

    {"cluster": {"worker": ["localhost:12345", "localhost:23456"]},
     "task": {"type": "worker", "index": 0}}

Every worker runs the same program; the chief (the ``"chief"`` task, or
worker 0 where there is none) writes the outputs, and the others write to
temporary directories that are removed afterwards, as TensorFlow's
multi-worker guide prescribes (saving may need every worker to take part).
"""

import contextlib
import json
import os
import shutil
import socket
import tempfile

from marginfit import files


def config():
    """The parsed ``TF_CONFIG``, or None where it names no cluster of
    several tasks."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}).") from None
    tasks = sum(len(addresses) for addresses in parsed.get("cluster", {}).values())
    return parsed if tasks > 1 else None


def strategy():
    """`tf.distribute.MultiWorkerMirroredStrategy` where ``TF_CONFIG`` names
    a cluster, else the default strategy. Create it before anything else
    uses TensorFlow's runtime. On another Keras backend, a scope that does
    nothing (that backend distributes with `keras.distribution`)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        if config() is not None:
            raise ValueError(
                f"TF_CONFIG names a cluster, but TensorFlow's multi-worker training "
                f"needs the TensorFlow backend (KERAS_BACKEND is "
                f"{keras.backend.backend()!r}). Unset TF_CONFIG, or set "
                "KERAS_BACKEND=tensorflow."
            )
        return _NoStrategy()
    import tensorflow as tf  # the TensorFlow backend's multi-worker training

    if config() is None:
        return tf.distribute.get_strategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


class _NoStrategy:
    """The strategy of a backend without `tf.distribute`: its scope does
    nothing."""

    def scope(self):
        return contextlib.nullcontext()


def is_chief():
    """Whether this task writes the outputs: no cluster, the ``"chief"``
    task, or worker 0 of a cluster without one."""
    parsed = config()
    if parsed is None:
        return True
    task = parsed.get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in parsed.get("cluster", {})


@contextlib.contextmanager
def output_directory(path, what):
    """Yields where this task writes its outputs: ``path`` for the chief
    (held against other writers, see `files.exclusive`), a temporary
    directory, removed on the way out, for the other workers."""
    if is_chief():
        with files.exclusive(path, what):
            yield path
        return
    temporary = tempfile.mkdtemp(prefix="marginfit-worker-")
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def free_ports(count):
    """``count`` TCP ports on localhost that are free now, for a cluster of
    local workers."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def local_tf_config(ports, index):
    """The ``TF_CONFIG`` (a JSON string) of worker ``index`` of a cluster of
    workers on localhost at ``ports``."""
    return json.dumps(
        {
            "cluster": {"worker": [f"localhost:{port}" for port in ports]},
            "task": {"type": "worker", "index": int(index)},
        }
    )
