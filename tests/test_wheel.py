"""The package as it would be released: an sdist and a wheel that `twine
check` accepts, and the wheel installed (not editable) into a fresh virtual
environment outside the repository runs both commands.

The environment sees the installed dependencies (``--system-site-packages``:
TensorFlow is not downloaded again, and nothing is fetched), while
marginfit itself comes from the wheel alone (checked).
"""

import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What a clean clone lacks: build outputs and run outputs.
IGNORED = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "runs", "__pycache__", ".pytest_cache", "site"
)


def run(*command, cwd):
    done = subprocess.run(list(map(str, command)), cwd=cwd, capture_output=True, text=True)
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
    run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", built[0], cwd=tmp_path)
    where = run(python, "-c", "import marginfit; print(marginfit.__file__)", cwd=tmp_path)
    assert where.strip().startswith(str(venv)), where
    run(bin_dir / "marginfit", "train", "--epochs", "1", "--output", tmp_path / "out", cwd=tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert "usage: marginfit-tune" in run(bin_dir / "marginfit-tune", "--help", cwd=tmp_path)
