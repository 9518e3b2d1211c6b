"""Fresh virtual environments that see the packages installed for the
Python running this code (TensorFlow is not downloaded again, nothing is
fetched), whether that Python is a system interpreter, a virtual
environment or a conda-style one.

`--system-site-packages` would not do: it sees the base interpreter's
packages, not an active virtual environment's, and it runs their ``.pth``
files, through which an editable install of marginfit would leak in. Here
the new environment's own ``site-packages`` comes first, then the running
Python's package directories, listed plainly in a ``.pth`` file (their own
``.pth`` files are not run).
"""

import os
import subprocess
import sys


def package_directories():
    """The directories this Python imports installed packages from, in its
    order (a virtual environment's, then its base's where it sees them)."""
    found = [entry for entry in sys.path if os.path.basename(entry) in _PACKAGE_DIRECTORIES]
    return [entry for entry in dict.fromkeys(found) if os.path.isdir(entry)]


_PACKAGE_DIRECTORIES = ("site-packages", "dist-packages")


def create(path):
    """Creates a virtual environment at ``path`` seeing this Python's
    packages after its own; returns its Python."""
    subprocess.run([sys.executable, "-m", "venv", os.fspath(path)], check=True)
    python = os.path.join(os.fspath(path), "bin", "python")
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(own, "_running_python_packages.pth"), "w") as file:
        file.write("".join(f"{directory}\n" for directory in package_directories()))
    return python
