"""Writing files and directories so that a crash never leaves half of one.

Every artefact is written under a temporary name next to its destination
and moved into place in one atomic rename, so that a reader (or a process
killed at any instant) sees the previous complete artefact or the new
complete one. Temporary names start with ``.marginfit-<pid>-``; what a
killed writer left behind is removed by the next writer in that directory.
"""

import contextlib
import ctypes
import os
import shutil
import tempfile

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic.
    fcntl = None

_PREFIX = ".marginfit-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _staging_prefix():
    return f"{_PREFIX}{os.getpid()}-"


def remove_stale(directory):
    """Removes the temporary files and directories of writers in
    ``directory`` whose process no longer runs."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        pid = name[len(_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _is_running(int(pid)):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory):
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to ``path`` (same suffix) to write a
    file to; once the block ends without error, the file replaces ``path``
    in one rename. On error the temporary file is removed and ``path`` is
    left as it was.

        with atomic_path("runs/model.keras") as temporary:
            model.save(temporary)
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale(directory)
    suffix = os.path.splitext(path)[1]
    descriptor, temporary = tempfile.mkstemp(suffix=suffix, prefix=_staging_prefix(), dir=directory)
    os.close(descriptor)
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_directory(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def write_text(path, text):
    """Writes ``text`` to ``path`` atomically (see `atomic_path`)."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as file:
        file.write(text)


def staging_directory(parent):
    """A new empty temporary directory in ``parent`` for `replace_directory`."""
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent)
    return tempfile.mkdtemp(prefix=_staging_prefix(), dir=parent)


def replace_directory(source, path):
    """Moves the directory ``source`` to ``path``, replacing any directory
    there, such that ``path`` always names one complete directory.

    Where the system can exchange two names atomically (Linux'
    ``renameat2``), the old directory is swapped out in one step and then
    deleted; elsewhere it is renamed away first, which leaves ``path``
    absent for an instant.
    """
    if not os.path.exists(path):
        os.replace(source, path)
    elif _exchange(source, path):
        shutil.rmtree(source)
    else:
        previous = source + ".previous"
        os.replace(path, previous)
        os.replace(source, path)
        shutil.rmtree(previous)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _exchange(first, second):
    """Swaps two paths atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100  # AT_FDCWD
    result = renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0


@contextlib.contextmanager
def exclusive(directory, what):
    """Holds an exclusive lock on ``directory`` for the block, or raises
    `RuntimeError` at once when another process holds it.

    The lock belongs to the open directory and dies with the process, so a
    killed writer never leaves a stale lock.

    Args:
        directory: The output directory (created if missing).
        what: Name of the writer, for the message.
    """
    os.makedirs(directory, exist_ok=True)
    if fcntl is None:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"Another process is writing to {directory!r} ({what}). Wait for it "
                "to finish, or choose another output directory."
            ) from None
        yield
    finally:
        os.close(descriptor)
