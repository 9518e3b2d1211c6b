"""The documentation cannot drift from the code: the site builds with no
warning, and the Python code of README.md and of every page under docs/
runs.

A page's ```python blocks run in order in one namespace, after the page's
hidden setup (an HTML comment that starts with ``<!-- setup``), in a fresh
working directory; a block right after a ``<!-- no-run -->`` line is shown,
not run.
"""

import pathlib
import re
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
SETUP = re.compile(r"^<!-- setup[^\n]*\n(.*?)^-->$", re.S | re.M)
NO_RUN = "<!-- no-run -->"
OPTIONAL = ("keras_hub",)  # pages that use it are skipped where it is missing


def pages():
    docs = ROOT / "docs"
    found = [ROOT / "README.md"] + sorted(
        path for path in docs.rglob("*.md") if "results" not in path.relative_to(docs).parts
    )
    return [path for path in found if BLOCK.search(path.read_text())]


def runnable(text):
    """The page's setup, then each block not marked `NO_RUN`."""
    code = [match.group(1) for match in SETUP.finditer(text)]
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        if not (before and before[-1].strip() == NO_RUN):
            code.append(match.group(1))
    return code


@pytest.mark.parametrize("page", pages(), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_code_of_a_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    namespace = {"__name__": "__docs__"}
    code = runnable(page.read_text())
    assert code
    for index, block in enumerate(code):
        try:
            exec(compile(block, f"{page.name}, block {index}", "exec"), namespace)
        except ModuleNotFoundError as error:
            if error.name not in OPTIONAL:
                raise
            pytest.skip(f"{page.name} needs {error.name}, which is not installed")


def test_every_page_with_code_is_found():
    """The collection is not vacuous: the quick start, the home page and
    the guides."""
    names = {str(path.relative_to(ROOT)) for path in pages()}
    assert {
        "README.md", "docs/index.md", "docs/guides/margin.md", "docs/guides/saving.md",
        "docs/guides/keras-hub.md",
    } <= names  # fmt: skip


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: no broken link or anchor, every API page
    rendered from the docstrings without a warning."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "marginfit" / "index.html").read_text()
    for name in ("MarginModel", "LargeMargin", "margin_distances"):
        assert name in api
