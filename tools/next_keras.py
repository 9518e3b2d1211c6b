"""Runs the test suite, or some of its tests, on the next Keras: a Keras
wheel installed into a fresh virtual environment that otherwise sees this
Python's packages (`environments.py`), with marginfit installed there from
this checkout (editable).

    python tools/next_keras.py [--wheel PATH] [--venv DIR] [PYTEST_ARGS...]

The wheel defaults to the newest ``keras-*.whl`` in ``../shared/wheels``
beside the repository (Keras' main branch, built as a wheel). Nothing is
downloaded. Exits with pytest's status.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import environments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(os.path.dirname(ROOT), "shared", "wheels")


def newest_wheel(directory=WHEELS):
    """The newest Keras wheel in ``directory``, or None."""
    found = sorted(glob.glob(os.path.join(directory, "keras-*.whl")))
    return found[-1] if found else None


def prepare(venv, wheel):
    """The Python of a fresh environment at ``venv`` with ``wheel`` and this
    checkout installed; prints their versions."""
    python = environments.create(venv)
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run([*install, wheel], check=True)
    subprocess.run([*install, "--no-build-isolation", "-e", ROOT], check=True, cwd=ROOT)
    subprocess.run(
        [python, "-c", "import keras, marginfit; print('keras', keras.__version__)"],
        check=True,
        cwd=ROOT,
    )
    return python


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", default=newest_wheel(), help="the Keras wheel to test on")
    parser.add_argument("--venv", help="where to create the environment (default: temporary)")
    args, pytest_args = parser.parse_known_args(argv)
    if not args.wheel or not os.path.isfile(args.wheel):
        raise SystemExit(f"No Keras wheel at {args.wheel!r}: give one with --wheel.")
    with tempfile.TemporaryDirectory(prefix="next-keras-") as temporary:
        python = prepare(args.venv or os.path.join(temporary, "venv"), args.wheel)
        command = [python, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args]
        return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
