"""A writer killed at any instant leaves each artefact complete: the
previous one or the new one, never half of one; concurrent writers never mix
their files, and the commands refuse a second writer of one directory."""

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import marginfit
from marginfit import cli, files

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = 6
CONCURRENT_KILLS = 3
ARTEFACTS = {"saved", "model.keras", "summary.json", "results.json", "results.csv"}


class Writer:
    """A `writer_worker.py` process; killed (and reaped) on exit. It imports
    and builds its models at once, and starts writing on `start`."""

    def __init__(self, directory, tag):
        self.log = open(os.path.join(directory, f"..{tag}.stderr"), "w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "writer_worker.py"), directory, tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def start(self):
        self._expect("ready")
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def wait_for_round(self):
        """Blocks until the writer has finished a round; returns seconds."""
        started = time.monotonic()
        self._expect("round")
        return time.monotonic() - started

    def _expect(self, word):
        line = self.process.stdout.readline()
        if not line.startswith(word):
            self.process.wait(timeout=60)
            self.log.seek(0)
            pytest.fail(f"writer stopped: {self.log.read()[-3000:]}")

    def kill(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        for stream in (self.process.stdin, self.process.stdout, self.log):
            stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def writers(stack, directory, tags):
    """A `Writer` per tag, killed when ``stack`` closes."""
    return [stack.enter_context(Writer(directory, tag)) for tag in tags]


def expected_weights(directory):
    loaded = {}
    for name in "ab":
        with np.load(os.path.join(directory, f"expected_{name}.npz")) as arrays:
            loaded[name] = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return loaded


def which(weights, expected):
    """Name of the model whose weights these are exactly, or None."""
    for name, reference in expected.items():
        if len(weights) == len(reference) and all(
            np.array_equal(w, r) for w, r in zip(weights, reference)
        ):
            return name
    return None


def check_complete(directory, expected):
    """Each artefact loads and is wholly model a's or wholly model b's."""
    saved = marginfit.load_model(os.path.join(directory, "saved"), compile=False)
    assert which(saved.get_weights(), expected) is not None
    archive = keras.saving.load_model(os.path.join(directory, "model.keras"), compile=False)
    assert which(archive.get_weights(), expected) is not None
    with open(os.path.join(directory, "summary.json")) as file:
        assert json.load(file)["model"] in expected
    with open(os.path.join(directory, "results.json")) as file:
        rows = json.load(file)
    assert len(rows) == 2000 and len({row["model"] for row in rows}) == 1
    with open(os.path.join(directory, "results.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2000 and len({row["model"] for row in rows}) == 1


def check_no_leftovers(directory):
    """Once the killed writers' temporary files are cleared, only the
    artefacts (and this test's files) remain."""
    files.remove_stale(directory)
    names = {n for n in os.listdir(directory) if not n.startswith(("..", "expected_"))}
    assert names == ARTEFACTS, names


def kill_rounds(directory, kills, per_kill, seed):
    """``kills`` times: starts ``per_kill`` writers at once, kills them all at
    an instant within their next two rounds, and checks every artefact. The
    instants are stratified: the k-th falls at random in the k-th of
    ``kills`` equal parts of the two rounds, so that few kills cover every
    phase of a write. The next writers start (import and build) while the
    last ones' files are checked; they write nothing before `Writer.start`."""
    chooser = random.Random(seed)
    parts = chooser.sample(range(kills), kills)
    with contextlib.ExitStack() as stack:
        upcoming = writers(stack, directory, [f"w{k}" for k in range(per_kill)])
        for kill in range(kills):
            current = upcoming
            for writer in current:
                writer.start()
            duration = max(writer.wait_for_round() for writer in current)
            time.sleep(2 * duration * (parts[kill] + chooser.random()) / kills)
            for writer in current:
                writer.kill()
            if kill + 1 < kills:
                tags = [f"w{(kill + 1) * per_kill + k}" for k in range(per_kill)]
                upcoming = writers(stack, directory, tags)
            check_complete(directory, expected_weights(directory))
    check_no_leftovers(directory)


def test_killed_writer_leaves_complete_artefacts(tmp_path):
    kill_rounds(str(tmp_path), KILLS, per_kill=1, seed=0)


def test_concurrent_writers_never_mix_their_files(tmp_path):
    kill_rounds(str(tmp_path), CONCURRENT_KILLS, per_kill=2, seed=1)


def test_a_second_command_on_one_output_directory_is_refused(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from marginfit import files\n"
            "with files.exclusive(sys.argv[1], 'test'):\n"
            "    print('holding', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().startswith("holding")
        for command in ("train", "compare"):
            with pytest.raises(SystemExit, match="Another process is writing to"):
                cli.main([command, "--epochs", "1", "--output", str(tmp_path)])
        assert os.listdir(tmp_path) == []
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdout.close()
