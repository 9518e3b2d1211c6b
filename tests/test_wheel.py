"""The package as it would be released: an sdist and a wheel that `twine
check` accepts, and the wheel installed (not editable) into a fresh virtual
environment outside the repository runs both commands.

The environment sees the dependencies installed for the Python running the
tests (`tools/environments.py`: TensorFlow is not downloaded again, nothing
is fetched, and this works from a virtual environment too), while marginfit
itself, every module of it, comes from the wheel alone (checked).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import environments  # noqa: E402

# What a clean clone lacks: build outputs and run outputs.
IGNORED = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "runs", "__pycache__", ".pytest_cache", "site"
)


# A checkout on PYTHONPATH would shadow the installed wheel.
CLEAN_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def run(*command, cwd):
    done = subprocess.run(
        list(map(str, command)), cwd=cwd, capture_output=True, text=True, env=CLEAN_ENV
    )
    assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(wheel, sdist)`` built from a copy of the checkout, without network
    (``--no-isolation``: the installed setuptools builds it)."""
    work = tmp_path_factory.mktemp("release")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED, symlinks=True)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", work / "dist", ".", cwd=source)
    (wheel,) = (work / "dist").glob("*.whl")
    (sdist,) = (work / "dist").glob("*.tar.gz")
    return wheel, sdist


def test_twine_accepts_both_files(built):
    output = run(sys.executable, "-m", "twine", "check", *built, cwd=built[0].parent)
    assert output.count("PASSED") == 2


def test_the_wheel_holds_the_package_and_the_tuning_subpackage_only(built):
    names = zipfile.ZipFile(built[0]).namelist()
    assert "marginfit/model.py" in names and "marginfit/tuning/search.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "tuning/", "docs/"))]


def test_the_installed_wheel_runs_both_commands(built, tmp_path):
    venv = tmp_path / "venv"
    python = environments.create(venv)
    bin_dir = venv / "bin"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", built[0], cwd=tmp_path)
    code = (
        "import pkgutil, sys, marginfit, marginfit.tuning\n"
        "skipped = ('marginfit.backend.jax', 'marginfit.backend.torch',\n"
        "           'marginfit.tuning.__main__')\n"
        "for found in pkgutil.walk_packages(marginfit.__path__, 'marginfit.'):\n"
        "    if not found.name.startswith(skipped):\n"
        "        __import__(found.name)\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    if name.startswith('marginfit'):\n"
        "        print('module', module.__file__)\n"
    )
    output = run(python, "-c", code, cwd=tmp_path).splitlines()
    where = [line.split(" ", 1)[1] for line in output if line.startswith("module ")]
    assert len(where) > 20 and all(path.startswith(str(venv)) for path in where), where
    run(bin_dir / "marginfit", "train", "--epochs", "1", "--output", tmp_path / "out", cwd=tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert "usage: marginfit-tune" in run(bin_dir / "marginfit-tune", "--help", cwd=tmp_path)
