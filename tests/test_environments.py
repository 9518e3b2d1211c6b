"""The README's test command inside a virtual environment: the environments
that the tests create (`tools/environments.py`) see the packages of the
Python that runs them, also when that Python is itself a virtual
environment's (``--system-site-packages`` would give the base
interpreter's instead)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import environments  # noqa: E402


def output(*command):
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_an_environment_created_from_a_virtual_environment_sees_its_packages(tmp_path):
    user = environments.create(tmp_path / "user")  # a user's virtual environment
    own = output(user, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    pathlib.Path(own, "only_in_the_user_environment.py").write_text("VALUE = 42\n")
    create = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import environments; "
        f"print(environments.create({str(tmp_path / 'test')!r}))"
    )
    python = output(user, "-c", create).splitlines()[-1]
    seen = "import only_in_the_user_environment as m, keras; print(m.VALUE, keras.__file__)"
    value, keras_file = output(python, "-c", seen).split()
    assert value == "42"
    assert not keras_file.startswith(str(tmp_path))  # the running Python's Keras, not a copy
