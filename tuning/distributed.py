"""keras-tuner's distributed search, as `marginfit-tune` runs it.

keras-tuner runs one chief (which serves the oracle over gRPC and runs no
trial) and any number of workers (which ask it for trials and run them),
from three environment variables set on every process:

    KERASTUNER_TUNER_ID      "chief" on the chief, "tuner0", "tuner1", ... on workers
    KERASTUNER_ORACLE_IP     the chief's address, e.g. 127.0.0.1
    KERASTUNER_ORACLE_PORT   the chief's port, e.g. 8000

keras-tuner's chief waits for every trial it handed out, so a worker that
dies mid-trial would stall the search for good. The oracles of
`marginfit-tune` subclass keras-tuner's (`watched`, as keras-tuner's
`synchronized` documents), noting when each worker last called; a worker
training a trial calls every `HEARTBEAT_SECONDS` from a thread of its own
(`Heartbeat`), however long its epochs take; on the chief, `watch_workers`
ends the trial of a worker silent for longer than a timeout as invalid:
keras-tuner then retries it on another worker (``max_retries_per_trial``).
For that, a worker that asks for a trial when the budget is handed out but
other workers' trials are still running is told to wait (keras-tuner's
``IDLE``) instead of to stop, so that it is there to take over a retried
trial; the search finishes its budget.
"""

import os
import threading
import time

import keras_tuner as kt

TUNER_ID = "KERASTUNER_TUNER_ID"

HEARTBEAT_SECONDS = 2.0
"""How often a worker training a trial tells the chief it is alive."""


def role():
    """``"chief"``, ``"worker"``, or None where the search is not
    distributed (keras-tuner's variables are not set)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    return "chief" if "chief" in os.environ.get(TUNER_ID, "") else "worker"


class WatchedWorkers:
    """Mixin of a keras-tuner oracle (see `watched`): notes when each worker
    last called, and tells a worker to wait, not to stop, while other
    workers' trials run after the budget is handed out."""

    wait_seconds = 1.0
    """How long a worker told to wait waits before it asks again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_seen = {}

    def create_trial(self, tuner_id):
        self.last_seen[tuner_id] = time.monotonic()
        trial = super().create_trial(tuner_id)
        others_running = any(other != tuner_id for other in self.ongoing_trials)
        if trial.status == kt.engine.trial.TrialStatus.STOPPED and others_running:
            # Undo the stop (keras-tuner forgets a stopped worker) and have
            # the worker ask again shortly.
            self.tuner_ids.add(tuner_id)
            time.sleep(self.wait_seconds)
            return kt.engine.trial.Trial(
                self.get_space(), trial_id="", status=kt.engine.trial.TrialStatus.IDLE
            )
        return trial

    def update_trial(self, trial_id, metrics, step=0):
        self._seen_running(trial_id)
        return super().update_trial(trial_id, metrics, step=step)

    def get_trial(self, trial_id):
        # A worker's `Heartbeat` calls this while it trains the trial.
        self._seen_running(trial_id)
        return super().get_trial(trial_id)

    def _seen_running(self, trial_id):
        """Notes that the worker training trial ``trial_id`` called."""
        for tuner_id, trial in list(self.ongoing_trials.items()):
            if trial.trial_id == trial_id:
                self.last_seen[tuner_id] = time.monotonic()


class Heartbeat:
    """Asks the chief for trial ``trial_id`` every ``interval`` seconds from
    a daemon thread, until `stop`: the chief's `watch_workers` then counts
    the worker alive however long an epoch takes (tracing, a busy machine).

    Args:
        oracle: The worker's oracle (keras-tuner's client of the chief's).
        trial_id: The trial the worker trains.
        interval: Seconds between calls.
    """

    def __init__(self, oracle, trial_id, interval=HEARTBEAT_SECONDS):
        self._stopped = threading.Event()

        def beat():
            while not self._stopped.wait(interval):
                try:
                    oracle.get_trial(trial_id)
                except Exception:  # the chief has gone: the search ends without us
                    return

        self._thread = threading.Thread(target=beat, name="marginfit-heartbeat", daemon=True)
        self._thread.start()

    def stop(self):
        self._stopped.set()
        self._thread.join()


class BeatingTuner:
    """Mixin of a keras-tuner tuner: on a worker of a distributed search, a
    `Heartbeat` runs while each trial trains."""

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        self._heartbeat = Heartbeat(self.oracle, trial.trial_id) if role() == "worker" else None

    def on_trial_end(self, trial):
        if getattr(self, "_heartbeat", None) is not None:
            self._heartbeat.stop()
        super().on_trial_end(trial)


_WATCHED = {}


def watched(oracle_class):
    """``oracle_class`` (a keras-tuner oracle) with `WatchedWorkers` mixed in;
    one class per oracle class."""
    if oracle_class not in _WATCHED:
        _WATCHED[oracle_class] = type(
            f"Watched{oracle_class.__name__}", (WatchedWorkers, oracle_class), {}
        )
    return _WATCHED[oracle_class]


def watch_workers(oracle, timeout, interval=1.0, stop=None):
    """Starts a daemon thread on the chief that ends, as invalid, the trial
    of every worker that has not called the oracle for ``timeout`` seconds
    (a worker training a trial calls every `HEARTBEAT_SECONDS`).

    Args:
        oracle: The chief's oracle, a `WatchedWorkers`.
        timeout: Seconds of silence after which a worker counts as dead;
            several `HEARTBEAT_SECONDS`.
        interval: Seconds between checks.
        stop: A `threading.Event` that ends the watch once set (None: it
            runs as long as the process).

    Returns:
        The started `threading.Thread`.
    """
    if not isinstance(oracle, WatchedWorkers):
        raise TypeError(
            f"watch_workers needs an oracle of `watched(...)`; received {type(oracle).__name__}."
        )
    oracle.wait_seconds = interval
    last_seen = oracle.last_seen

    stop = stop or threading.Event()

    def watch():
        while not stop.wait(interval):
            now = time.monotonic()
            for tuner_id, trial in list(oracle.ongoing_trials.items()):
                silent = now - last_seen.get(tuner_id, now)
                if silent <= timeout:
                    continue
                print(
                    f"marginfit-tune: worker {tuner_id} has been silent for {silent:.0f} s; "
                    f"trial {trial.trial_id} is handed to another worker.",
                    flush=True,
                )
                trial.status = kt.engine.trial.TrialStatus.INVALID
                trial.message = f"worker {tuner_id} stopped responding"
                oracle.end_trial(trial)
                oracle.tuner_ids.discard(tuner_id)
                last_seen.pop(tuner_id, None)

    thread = threading.Thread(target=watch, name="marginfit-watch-workers", daemon=True)
    thread.start()
    return thread
