"""Workers that share one study: who runs each trial, heartbeats, dead workers' trials
failed and retried, which started trial is one too many, and the worker processes a search
starts on this machine (:func:`spawn_worker`).

Optuna's own heartbeat exists only for RDB storages and journal files have none,
so liveness is kept here the same way for every storage: each running trial
records its process (host, pid, start time) and stamps the time while it runs.
Optuna's storage API is reached through ``study._storage`` where no public
method sets a trial's system attributes or state by id.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import optuna
import torch

from autoprune.errors import AutopruneError

# Trial states, as every module names them.
RUNNING, COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE,
                                   optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
ENDED = (COMPLETE, PRUNED)  # what counts towards the trials asked for, as in Optuna's n_trials

HEARTBEAT_S = 10.0  # how often a running trial says it is alive
GRACE_S = 60.0  # a trial of another machine silent this long is taken for dead
MAX_RETRY = 3  # a trial whose worker died is tried again at most this often
POLL_S = 2.0  # how often a worker with nothing to start looks again


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot), so a reused pid is told apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass(frozen=True)
class Worker:
    """The process running a trial, as recorded on the trial.

    Example:
        >>> Worker.me().alive()
        True
    """

    host: str
    pid: int
    started: str = ""

    @classmethod
    def me(cls) -> "Worker":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    def alive(self) -> bool:
        """Whether the process still runs (meaningful on its own host only)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return not self.started or _process_start(self.pid) in ("", self.started)


def started_at(trial: optuna.trial.FrozenTrial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def _stale(trial: optuna.trial.FrozenTrial, me: Worker, now: float, grace: float) -> bool:
    """Whether a RUNNING trial's worker is gone: a dead process here, or silence elsewhere."""
    who = trial.system_attrs.get("autoprune:worker")
    if who and who["host"] == me.host:
        return not Worker(**who).alive()
    last = trial.system_attrs.get("autoprune:beat") or started_at(trial)
    return now - last > grace


def recover(study: optuna.Study, grace: float = GRACE_S) -> list[int]:
    """Mark the trials of dead workers failed and queue each again; returns their numbers.

    Several workers may call this at once: the storage lets only one of them
    fail a given trial, and only that one queues the retry.
    """
    me, now, failed = Worker.me(), time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
        if not _stale(trial, me, now, grace):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "failed", "its worker died")
            if not study._storage.set_trial_state_values(trial._trial_id, FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        failed.append(trial.number)
        retry(study, trial)
    return failed


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue the parameters of a trial that could not finish, up to ``MAX_RETRY`` times."""
    params = trial.params or trial.system_attrs.get("fixed_params")
    retries = trial.user_attrs.get("retries", 0)
    kept = {k: trial.user_attrs[k] for k in ("stratum", "reference") if k in trial.user_attrs}
    if params and retries < MAX_RETRY:
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number, "retries": retries + 1, **kept})


def claim(study: optuna.Study, trial_id: int) -> None:
    """Record this process as the trial's worker, so :func:`recover` knows when it died."""
    study._storage.set_trial_system_attr(trial_id, "autoprune:worker", asdict(Worker.me()))
    study._storage.set_trial_system_attr(trial_id, "autoprune:beat", time.time())


@contextmanager
def heartbeat(study: optuna.Study, trial_id: int, interval: float = HEARTBEAT_S) -> Iterator[None]:
    """Record the worker on the trial and keep stamping the time while the trial runs."""
    storage = study._storage
    claim(study, trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.set_trial_system_attr(trial_id, "autoprune:beat", time.time())
            except Exception:  # the trial ended or the storage went away: nothing left to keep alive
                return

    thread = threading.Thread(target=beat, name="autoprune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def surplus(study: optuna.Study, number: int, wanted: int) -> str | None:
    """Why trial ``number``, just started, must not run, or None.

    Trials are ordered by start time (then number), an order every worker sees
    alike: a trial is surplus when the finished trials and those started before
    it already make ``wanted``, or when an earlier live trial has its fixed
    parameters (a queued trial that two workers queued).
    """
    trials = study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == number)
    key = (started_at(mine), number)
    earlier = [t for t in trials if t.number != number and t.state in (RUNNING, *ENDED)
               and (t.state in ENDED or (started_at(t), t.number) < key)]
    if sum(t.state in ENDED for t in trials) + sum(t.state == RUNNING for t in earlier) >= wanted:
        return f"{wanted} trials were already finished or running"
    fixed = mine.system_attrs.get("fixed_params")
    stratum = mine.user_attrs.get("stratum")  # a range study queues the same uniform ratios for every target
    if fixed and any(t.system_attrs.get("fixed_params") == fixed and t.user_attrs.get("stratum") == stratum
                     for t in earlier):
        return "a copy of an earlier queued trial"
    return None


HOLD_ENV = "AUTOPRUNE_TEST_HOLD_UNTIL_WORKERS"  # test-only; see hold_for_test
HOLD_TIMEOUT_S = 240.0


def hold_for_test(study: optuna.Study) -> None:
    """Test-only: hold a started trial until ``$AUTOPRUNE_TEST_HOLD_UNTIL_WORKERS`` processes have started one.

    A test of several workers sets it so that each worker's first trial runs
    however late a worker starts; no timing decides whether all took part. A
    worker that never starts a trial fails the trial after ``HOLD_TIMEOUT_S``.
    Unset (always, outside tests) it does nothing.
    """
    wanted = int(os.environ.get(HOLD_ENV) or 0)
    if not wanted:
        return
    end = time.monotonic() + HOLD_TIMEOUT_S
    while len(seen := trial_workers(study)) < wanted:
        if time.monotonic() > end:
            raise AutopruneError(f"{HOLD_ENV}={wanted}: only {len(seen)} worker process(es) started a trial "
                                 f"within {HOLD_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def trial_workers(study: optuna.Study) -> set[tuple[str, int]]:
    """The (host, pid) of every process that ran or runs a trial of ``study``."""
    return {(w["host"], w["pid"]) for t in study.get_trials(deepcopy=False)
            if (w := t.system_attrs.get("autoprune:worker"))}


def sampler_stream(shared: bool) -> int:
    """This process's sampler stream: workers on other machines (a ``shared`` storage) must not draw
    the same candidates, so each process gets its own; 0 where only this machine works on the study."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) if shared else 0


def spawn_worker(target: Callable[..., object], args: tuple, index: int, workers: int) -> multiprocessing.Process:
    """Start worker process ``index`` of ``workers``: ``target(*args, _worker=index)`` on its share of the cores.

    ``target`` is the search itself, handed in: the API that holds it sits above this module.
    """
    process = multiprocessing.get_context("spawn").Process(
        target=_worker_main, args=(target, args, index, os.getpid(), max(1, torch.get_num_threads() // workers)),
        name=f"autoprune-worker-{index}")
    process.start()
    return process


def _worker_main(target: Callable[..., object], args: tuple, index: int, parent: int, threads: int) -> None:
    """Body of a spawned worker: run trials; die with the parent rather than outlive it."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)  # the parent was killed: its next run fails and retries this worker's trial

    threading.Thread(target=watch, daemon=True).start()
    torch.set_num_threads(threads)
    try:
        target(*args, _worker=index)
    except KeyboardInterrupt:  # Ctrl-C reaches every process; the parent says what to do
        raise SystemExit(130) from None
    except AutopruneError as err:
        print(f"autoprune: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def join_workers(children: list[multiprocessing.Process], check: bool = True) -> None:
    """Wait for the worker processes; with ``check``, one that stopped with an error is an error here."""
    for child in children:
        child.join()
    failed = [c.name for c in children if c.exitcode]
    if failed and check:
        raise AutopruneError(f"{', '.join(failed)} stopped with an error (see above); "
                             "run the same command again to resume")


@contextmanager
def share_cores(workers: int) -> Iterator[None]:
    """Share the CPU cores among the worker processes while they run."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)
