"""The Optuna search over per-group pruning ratios.

A trial picks one ratio per group within the bounds sensitivity allows; the
pick is projected onto the budget before anything is trained (no candidate is
ever over budget, none wastes much of it), the pruned model is fine-tuned
briefly and scored on validation data. Plan, FLOPs, params and accuracy are
stored on the trial, so the study alone is the record of the search.

Trials are cheap to throw away: each reports its cheap score (pruned, BatchNorm
recalibrated, not fine-tuned) as step 0 and its validation accuracy part-way
through the fine-tune as later steps, and a median pruner stops a trial below
the median of the trials that got as far (on step 0 only while the cheap score
ranks the finished trials). The fine-tuned weights of
the best few trials are kept, so the final fine-tune goes on from the winner's.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import pandas as pd
import torch
from sqlalchemy.exc import SQLAlchemyError
from torch import nn
from tqdm.auto import tqdm

from .budget import fit_plan, usage
from .costmodel import CostModel
from .counting import Cost, human
from .data import Data
from .defaults import FINETUNE_LR
from .distill import from_settings
from .errors import AutopruneError, one_line
from .files import save_torch
from .groups import ChannelGroups
from .latency import describe as describe_latency, trial_latency
from .plan import Plan
from .training import evaluate, recalibrate_bn, train

optuna.logging.set_verbosity(optuna.logging.WARNING)
# set_metric_names is marked experimental; the warning would only clutter every run's output.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

RUNNING, COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE,
                                   optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
ENDED = (COMPLETE, PRUNED)  # what counts towards the trials asked for, as in Optuna's n_trials
PRUNERS = ("median", "none")


@dataclass(frozen=True)
class Stratum:
    """One target of a range study: its caps and the sensitivity seed that just meets them."""

    budget: str
    limits: Cost
    seed: np.ndarray


@dataclass
class Problem:
    """Everything a trial needs, fixed for the whole study."""

    model: nn.Module
    data: Data
    groups: ChannelGroups
    costs: CostModel
    limits: Cost
    low: np.ndarray
    high: np.ndarray
    seed_ratios: np.ndarray
    base_val_accuracy: float
    device: torch.device
    round_to: int = 1
    checkpoints: Path | None = None  # where trials keep their fine-tuned weights (None: not kept)
    meter: Any = None  # a latency.Meter: every candidate's latency is measured and recorded (None: not)
    strata: list[Stratum] = field(default_factory=list)  # a range study's targets; empty for one budget

    def limits_for(self, trial: optuna.Trial | optuna.trial.FrozenTrial) -> Cost:
        """The caps trial ``trial`` is projected onto: its stratum's in a range study."""
        stratum = trial.user_attrs.get("stratum")
        return self.limits if stratum is None or not self.strata else self.strata[stratum].limits


@dataclass
class Settings:
    """How the search trains and scores candidates (recorded with the study)."""

    trials: int = 12
    finetune_epochs: float = 1.0
    final_epochs: float = 5.0
    lr: float = FINETUNE_LR
    batch_size: int = 64
    bn_batches: int = 8
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"  # or "none": every trial is fine-tuned to the end
    trial_bn_batches: int = 2  # BatchNorm recalibration before a trial's cheap score
    checks: int = 1  # validation checks (chances to be pruned) during a trial's fine-tune
    final_seconds: float = 0.0  # with a time budget: the final fine-tune trains this long, not final_epochs

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise AutopruneError(f"unknown pruner {self.pruner!r}; choose from {', '.join(PRUNERS)}")


class ReachedMedianPruner(optuna.pruners.BasePruner):
    """Prune a trial whose value at a step is below the median of every trial that reached that step.

    Optuna's :class:`~optuna.pruners.MedianPruner` compares with finished trials
    only. Screening on step 0 would then compare each candidate with the
    survivors of earlier screens, and fewer and fewer would pass; comparing with
    all trials that got as far, pruned ones included, lets about half go on at
    each step. Nothing is pruned before ``startup`` trials have finished.

    Step 0 is the cheap score, which ranks candidates well on some models and
    not at all on others. It screens only while its Spearman correlation with
    the final value over the finished trials (at least ``startup``, and 5) is
    at least ``min_rank``: the study checks its own screen as it goes.

    In a range study each trial is compared with the trials of its own stratum
    (target) only, and a uniform reference trial is never pruned.

    Example:
        >>> study = optuna.create_study(direction="maximize", pruner=ReachedMedianPruner(startup=3))
    """

    def __init__(self, startup: int = 3, min_rank: float = 0.5) -> None:
        self.startup, self.min_rank = startup, min_rank

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if trial.user_attrs.get("reference"):  # a reference curve's point is fine-tuned to the end
            return False
        # In a range study a trial at 5 % of the FLOPs is not worse for trailing one at 50 %:
        # it is compared with its own stratum only (one budget: every trial has stratum None).
        stratum = trial.user_attrs.get("stratum")
        done = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
                if t.user_attrs.get("stratum") == stratum]
        if step is None or len(done) < self.startup or (step == 0 and screen_rank(done) < self.min_rank):
            return False
        seen = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=ENDED)
                if step in t.intermediate_values and t.user_attrs.get("stratum") == stratum]
        better = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        return bool(seen) and better * trial.intermediate_values[step] < better * float(np.median(seen))


def screen_rank(trials: list[optuna.trial.FrozenTrial], least: int = 5) -> float:
    """Spearman correlation of the finished trials' cheap scores (step 0) with their values; -1 if too few."""
    pairs = [(t.intermediate_values[0], t.value) for t in trials if 0 in t.intermediate_values]
    if len(pairs) < least:
        return -1.0
    cheap, final = (pd.Series(column) for column in zip(*pairs))
    rho = cheap.corr(final, method="spearman")
    return -1.0 if rho != rho else float(rho)  # NaN: one of them never varied


def pruner_for(settings: Settings) -> optuna.pruners.BasePruner:
    """The search's pruner over a trial's steps (0: the cheap score, then checks during fine-tuning)."""
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    return ReachedMedianPruner(startup=max(3, settings.trials // 6))


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: a database URL or a journal file ending in .log/.journal.

    Dead trials are found by :func:`recover` (process ids and heartbeats), the
    same way for every storage, so no Optuna heartbeat is configured here.
    """
    if url.startswith(("sqlite", "postgresql", "mysql")):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except ImportError as err:
            raise AutopruneError(f"storage {url.split(':')[0]} needs a driver: {err}; "
                                 "for PostgreSQL pip install psycopg2-binary and write postgresql+psycopg2://…") from None
        except SQLAlchemyError as err:  # a malformed URL, a server that does not answer
            raise AutopruneError(f"cannot open storage {url.split('@')[-1]}: {one_line(err)}") from None
    if url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        lock = JournalFileSymlinkLock(url)
        _repair_journal(Path(url), lock)
        return optuna.storages.JournalStorage(JournalFileBackend(url, lock_obj=lock))
    raise AutopruneError(f"unknown storage {url!r}; use sqlite:///file.db, postgresql://…, "
                         "mysql://… or a journal file ending in .log")


def _repair_journal(path: Path, lock: Any) -> None:
    """Cut a line half-written by a killed process off the end of a journal file.

    Optuna appends whole lines under ``lock``; a kill in the middle of one would
    otherwise glue the next record onto it and make the journal unreadable.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    lock.acquire()
    try:
        text = path.read_bytes()  # Optuna reads the whole journal anyway
        if not text.endswith(b"\n"):
            with open(path, "rb+") as f:
                f.truncate(text.rfind(b"\n") + 1)
    finally:
        lock.release()


def open_study(name: str, storage: str, config: dict[str, Any], new: bool = False) -> optuna.Study:
    """Create the study, or resume it if its stored configuration matches ``config``."""
    backend = storage_for(storage)
    if new:
        try:
            optuna.delete_study(study_name=name, storage=backend)
        except KeyError:
            pass
    study = optuna.create_study(study_name=name, storage=backend, direction="maximize",
                                load_if_exists=True)
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
        study.set_metric_names(["val_accuracy"])
        return study
    differs = [f"{key} was {stored.get(key)!r}, now {config.get(key)!r}"
               for key in sorted(set(stored) | set(config)) if stored.get(key) != config.get(key)]
    if differs:
        raise AutopruneError(f"study {name!r} was made with another configuration ({'; '.join(differs)}); "
                             "run it as it was, pass --new-study to start it afresh, or pick another --study")
    return study


class SharedTable:
    """Sensitivity cells kept on the study itself, one system attribute per cell.

    Every worker, on this machine or another, reads the cells already measured
    and adds the ones it measures, so a scan is done once per study.

    Example:
        >>> SharedTable(optuna.create_study()).rows()
        []
    """

    PREFIX = "autoprune:sensitivity:"

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def _attrs(self) -> dict[str, Any]:
        return self.study._storage.get_study_system_attrs(self.study._study_id)

    def rows(self) -> list[dict]:
        return [value for key, value in self._attrs().items() if key.startswith(self.PREFIX)]

    def add(self, row: dict) -> None:
        key = self.PREFIX + self._cell(row["base_model"], row["importance"], row["group"], row["ratio"])
        if key not in self._attrs():  # the first measurement stays: every worker sees the same table
            self.study._storage.set_study_system_attr(self.study._study_id, key, row)

    def claim(self, base_model: str, importance: str, group: str, ratio: float) -> bool:
        """Claim a cell to measure; False if another worker claimed it first."""
        key = "autoprune:claim:" + self._cell(base_model, importance, group, ratio)
        me = asdict(Worker.me())
        if key not in self._attrs():
            self.study._storage.set_study_system_attr(self.study._study_id, key, me)
        return self._attrs()[key] == me  # two at once: the last write holds, and all read the same

    @staticmethod
    def _cell(base_model: str, importance: str, group: str, ratio: float) -> str:
        return f"{base_model}:{importance}:{group}:{float(ratio):.6g}"


def finished(study: optuna.Study) -> int:
    """How many trials finished (fine-tuned and scored; pruned ones not counted)."""
    return len(study.get_trials(deepcopy=False, states=(COMPLETE,)))


def count_pruned(study: optuna.Study) -> int:
    """How many trials the pruner stopped."""
    return len(study.get_trials(deepcopy=False, states=(PRUNED,)))


def checkpoint(folder: Path, number: int) -> Path:
    """Where trial ``number`` keeps its fine-tuned weights."""
    return folder / f"trial-{number}.pt"


KEEP_CHECKPOINTS = 3


def keep_best_checkpoints(study: optuna.Study, folder: Path | None, keep: int = KEEP_CHECKPOINTS) -> None:
    """Delete the weights of every ended trial but the ``keep`` best (running ones are left alone)."""
    if folder is None or not folder.is_dir():
        return
    trials = study.get_trials(deepcopy=False)
    best = sorted((t for t in trials if t.state == COMPLETE), key=lambda t: t.value, reverse=True)[:keep]
    ended = {t.number for t in trials if t.state.is_finished()} - {t.number for t in best}
    for number in ended:
        checkpoint(folder, number).unlink(missing_ok=True)


def ratio_param(gid: str) -> str:
    """The Optuna parameter holding group ``gid``'s pruning ratio."""
    return f"ratio:{gid}"


def trial_plan(trial: optuna.trial.FrozenTrial) -> Plan:
    """The plan a finished trial trained."""
    return Plan.from_dict(trial.user_attrs["plan"])


class Objective:
    """One trial: sample ratios, fit them to the budget, screen, fine-tune, score.

    :meth:`start` cuts a candidate and takes its cheap score, :meth:`advance`
    fine-tunes it further and scores it: a trial is one of each, and successive
    halving (:mod:`autoprune.halving`) calls :meth:`advance` once per rung.
    """

    def __init__(self, problem: Problem, settings: Settings, quiet: bool) -> None:
        self.problem, self.settings, self.quiet = problem, settings, quiet

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        model = self.start(trial)
        accuracy = self.advance(trial, model, self.settings.finetune_epochs, 1, started,
                                checks=self.settings.checks)
        self.finish(trial, model, started)
        return accuracy

    def start(self, trial: optuna.Trial) -> nn.Module:
        """Sample the trial's ratios, cut the model within budget, report its cheap score as step 0."""
        p, s = self.problem, self.settings
        started = time.perf_counter()
        ratios = np.array([trial.suggest_float(ratio_param(gid), float(lo), float(hi))
                           for gid, lo, hi in zip(p.costs.ids, p.low, p.high)])
        if p.strata and trial.user_attrs.get("stratum") is None:
            stratum = choose_stratum(trial.study, len(p.strata), trial.number)
            trial.set_user_attr("stratum", stratum)
        if p.strata:
            trial.set_user_attr("target", p.strata[trial.user_attrs["stratum"]].budget)
        limits = p.limits_for(trial)
        plan, model, cost = fit_plan(p.groups, p.costs, ratios, limits, p.low, p.high, p.round_to)
        trial.set_user_attr("cut_seconds", round(time.perf_counter() - started, 3))
        base = p.costs.base
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("flops", cost.flops)
        trial.set_user_attr("params", cost.params)
        trial.set_user_attr("flops_share", cost.flops / base.flops)
        trial.set_user_attr("params_share", cost.params / base.params)
        if p.meter is not None:
            for key, value in trial_latency(p.meter, p.costs, plan.keep, model, cost).items():
                trial.set_user_attr(key, value)
        trial.set_constraint("budget", usage(cost, limits) - 1.0)
        torch.manual_seed(s.seed + trial.number)
        model.to(p.device)
        recalibrate_bn(model, self._train_loader(trial, 0), p.device, s.trial_bn_batches)
        clock = time.perf_counter()
        cheap = evaluate(model, p.data.loader("score", 256), p.device)
        trial.set_user_attr("score_seconds", round(time.perf_counter() - clock, 3))
        trial.set_user_attr("val_accuracy_before_finetune", cheap)
        self._report(trial, 0, cheap, started)  # screening: a hopeless cut is never fine-tuned
        return model

    def advance(self, trial: optuna.Trial, model: nn.Module, epochs: float, step: int,
                started: float, checks: int = 0) -> float:
        """Fine-tune ``model`` ``epochs`` more, score it and report the score as ``step``."""
        p, s = self.problem, self.settings
        score = p.data.loader("score", 256)
        clock = time.perf_counter()
        train(model, self._train_loader(trial, step), epochs, p.device, lr=s.lr, desc=f"trial {trial.number}",
              quiet=self.quiet, distill=from_settings(p.model, s.extra), checks=checks,
              check=lambda tuned, k: self._report(trial, step - 1 + k, evaluate(tuned, score, p.device),
                                                  started))
        trained, clock = time.perf_counter() - clock, time.perf_counter()
        accuracy = evaluate(model, score, p.device)
        scored = time.perf_counter() - clock
        trial.set_user_attr("val_accuracy", accuracy)
        attrs = trial.user_attrs
        trial.set_user_attr("score_seconds", round(attrs.get("score_seconds", 0.0) + scored, 3))
        trial.set_user_attr("epochs", attrs.get("epochs", 0.0) + epochs)
        trial.set_user_attr("train_seconds", round(attrs.get("train_seconds", 0.0) + trained, 3))
        return accuracy

    def finish(self, trial: optuna.Trial, model: nn.Module, started: float) -> None:
        """Keep the fine-tuned weights (the final fine-tune goes on from them) and the time taken."""
        if self.problem.checkpoints is not None:
            save_torch(model.state_dict(), checkpoint(self.problem.checkpoints, trial.number))
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))

    def _train_loader(self, trial: optuna.Trial, step: int):
        s = self.settings
        return self.problem.data.loader("train", s.batch_size, shuffle=True,
                                        seed=s.seed + trial.number + 100003 * max(0, step - 1))

    @staticmethod
    def _report(trial: optuna.Trial, step: int, accuracy: float, started: float) -> None:
        trial.report(accuracy, step)
        if trial.should_prune():
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            raise optuna.TrialPruned(f"val {accuracy:.2%} at step {step} is below the median")


def choose_stratum(study: optuna.Study, strata: int, number: int | None = None) -> int:
    """The stratum a new trial of a range study goes to: where the front is thinnest.

    That is the stratum with the fewest finished trials (pruned ones add no point
    to the front), then the fewest started: a fresh study fills the strata in
    turn, and a study resumed with more trials tops up the thin ones first.
    ``number`` (the trial asking) is left out of the count.

    Example:
        >>> choose_stratum(optuna.create_study(), 6)
        0
    """
    finished_in, started_in = np.zeros(strata, int), np.zeros(strata, int)
    for t in study.get_trials(deepcopy=False, states=(*ENDED, RUNNING)):
        k = t.user_attrs.get("stratum")
        if k is None or t.number == number or not 0 <= k < strata:
            continue
        finished_in[k] += t.state == COMPLETE
        started_in[k] += 1
    return int(min(range(strata), key=lambda k: (finished_in[k], started_in[k], k)))


def _describe(trial: optuna.trial.FrozenTrial, study: optuna.Study) -> str:
    attrs = trial.user_attrs
    best = study.best_trial
    target = f" | target {attrs['target']}" + (" (uniform)" if attrs.get("reference") else "") \
        if "target" in attrs else ""
    return (f"trial {trial.number}{target}: val {attrs['val_accuracy']:.2%} "
            f"(before fine-tune {attrs['val_accuracy_before_finetune']:.2%}) | "
            f"FLOPs {human(attrs['flops'])} ({attrs['flops_share']:.1%} of base, thop MACs) | "
            f"params {human(attrs['params'])} ({attrs['params_share']:.1%}){describe_latency(attrs)} | "
            f"{attrs['seconds']:.1f}s | "
            f"best {best.value:.2%} (trial {best.number})")


def _describe_pruned(trial: optuna.trial.FrozenTrial) -> str:
    step = trial.last_step
    when = "before fine-tuning (cheap score)" if step == 0 else f"at check {step} of the fine-tune"
    return (f"trial {trial.number}: pruned {when}: val {trial.intermediate_values[step]:.2%} "
            f"below the median | {trial.user_attrs.get('seconds', 0):.1f}s")


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


def _started(trial: optuna.trial.FrozenTrial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def _stale(trial: optuna.trial.FrozenTrial, me: Worker, now: float, grace: float) -> bool:
    """Whether a RUNNING trial's worker is gone: a dead process here, or silence elsewhere."""
    who = trial.system_attrs.get("autoprune:worker")
    if who and who["host"] == me.host:
        return not Worker(**who).alive()
    last = trial.system_attrs.get("autoprune:beat") or _started(trial)
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
        _retry(study, trial)
    return failed


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
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
def _heartbeat(study: optuna.Study, trial_id: int, interval: float = HEARTBEAT_S) -> Iterator[None]:
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


def _surplus(study: optuna.Study, number: int, wanted: int) -> str | None:
    """Why trial ``number``, just started, must not run, or None.

    Trials are ordered by start time (then number), an order every worker sees
    alike: a trial is surplus when the finished trials and those started before
    it already make ``wanted``, or when an earlier live trial has its fixed
    parameters (a queued trial that two workers queued).
    """
    trials = study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == number)
    key = (_started(mine), number)
    earlier = [t for t in trials if t.number != number and t.state in (RUNNING, *ENDED)
               and (t.state in ENDED or (_started(t), t.number) < key)]
    if sum(t.state in ENDED for t in trials) + sum(t.state == RUNNING for t in earlier) >= wanted:
        return f"{wanted} trials were already finished or running"
    fixed = mine.system_attrs.get("fixed_params")
    stratum = mine.user_attrs.get("stratum")  # a range study queues the same uniform ratios for every target
    if fixed and any(t.system_attrs.get("fixed_params") == fixed and t.user_attrs.get("stratum") == stratum
                     for t in earlier):
        return "a copy of an earlier queued trial"
    return None


HOLD_ENV = "AUTOPRUNE_TEST_HOLD_UNTIL_WORKERS"  # test-only; see _hold_for_test
HOLD_TIMEOUT_S = 240.0


def _hold_for_test(study: optuna.Study) -> None:
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
    while len(seen := _trial_workers(study)) < wanted:
        if time.monotonic() > end:
            raise AutopruneError(f"{HOLD_ENV}={wanted}: only {len(seen)} worker process(es) started a trial "
                                 f"within {HOLD_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def _trial_workers(study: optuna.Study) -> set[tuple[str, int]]:
    """The (host, pid) of every process that ran or runs a trial of ``study``."""
    return {(w["host"], w["pid"]) for t in study.get_trials(deepcopy=False)
            if (w := t.system_attrs.get("autoprune:worker"))}


def _counts(study: optuna.Study) -> tuple[int, int]:
    """Trials ended (finished or pruned) and running."""
    trials = study.get_trials(deepcopy=False, states=(*ENDED, RUNNING))
    done = sum(t.state in ENDED for t in trials)
    return done, len(trials) - done


def enqueue_seed(study: optuna.Study, problem: Problem) -> None:
    """Queue the sensitivity seed (equal accuracy drop) as the first trial of a new study.

    A range study queues one seed per target, then the uniform plan at every
    target: fine-tuned as every trial is and never pruned, they are the
    reference curve the report draws beside the front.
    """
    if problem.strata:
        if not study.trials:
            uniform = np.clip(np.zeros(len(problem.low)), problem.low, problem.high)  # projection scales it
            for k, stratum in enumerate(problem.strata):
                study.enqueue_trial(_params(problem, stratum.seed), user_attrs={"stratum": k})
            for k in range(len(problem.strata)):
                study.enqueue_trial(_params(problem, uniform), user_attrs={"stratum": k, "reference": "uniform"})
        return
    if not study.trials:
        study.enqueue_trial(_params(problem, problem.seed_ratios), skip_if_exists=True)


def _params(problem: Problem, ratios: np.ndarray) -> dict[str, float]:
    """A trial's parameters for ``ratios``, clipped to the bounds (rounding can step past one)."""
    ratios = np.clip(ratios, problem.low, problem.high)
    return {ratio_param(g): float(r) for g, r in zip(problem.costs.ids, ratios)}


def run(problem: Problem, study: optuna.Study, settings: Settings, quiet: bool = False,
        stream: int = 0, sampler: optuna.samplers.BaseSampler | None = None,
        seed_first: bool = True) -> optuna.Study:
    """Run trials until the study holds exactly ``settings.trials`` ended ones (finished or pruned).

    Any number of processes may run this on one study: each starts a trial only
    while finished plus running trials fall short of the total, and a trial that
    races past it is marked failed unrun. Trials of dead workers are failed and
    retried (:func:`recover`). ``stream`` keeps workers' samplers apart. TPE
    unless ``sampler``; the sensitivity seed goes first unless ``seed_first`` is off.
    """
    recover(study)
    if seed_first:
        enqueue_seed(study, problem)
    # A fixed seed would make a resumed study repeat its first trials: offset it.
    study.sampler = sampler or optuna.samplers.TPESampler(
        seed=settings.seed + len(study.trials) + stream, multivariate=True,
        n_startup_trials=max(3, min(10, settings.trials // 4)),
    )
    study.pruner = pruner_for(settings)
    objective = Objective(problem, settings, quiet)
    bar = tqdm(total=settings.trials, initial=_counts(study)[0], desc="search", unit="trial", disable=quiet)
    try:
        while True:
            recover(study)
            done, running = _counts(study)
            bar.n = done
            bar.refresh()
            if done >= settings.trials:
                break
            if done + running >= settings.trials:  # the rest is running elsewhere: wait for it
                time.sleep(POLL_S)
                continue
            _run_one(study, objective, settings.trials, quiet)
    finally:
        bar.close()
    return study


def _run_one(study: optuna.Study, objective: Objective, wanted: int, quiet: bool) -> None:
    """Ask for a trial, run it unless it is surplus, and tell the study how it went."""
    trial = study.ask()
    reason = _surplus(study, trial.number, wanted)
    if reason:
        trial.set_user_attr("skipped", reason)
        study.tell(trial, state=FAIL)
        return
    try:
        with _heartbeat(study, trial._trial_id):
            _hold_for_test(study)
            value = objective(trial)
    except optuna.TrialPruned:
        frozen = study.tell(trial, state=PRUNED)
        if not quiet:
            tqdm.write(_describe_pruned(frozen))
        keep_best_checkpoints(study, objective.problem.checkpoints)
        return
    except BaseException:
        study.tell(trial, state=FAIL)
        if not isinstance(sys.exc_info()[1], Exception):  # interrupted, not broken: try it again later
            _retry(study, study.get_trials(deepcopy=False)[trial.number])
        raise
    frozen = study.tell(trial, value)
    if frozen.state == COMPLETE and not quiet:
        tqdm.write(_describe(frozen, study))
    keep_best_checkpoints(study, objective.problem.checkpoints)


def best_trial(study: optuna.Study, number: int | None = None) -> optuna.trial.FrozenTrial:
    """The best finished trial, or trial ``number`` if given."""
    if number is None:
        if finished(study) == 0:
            raise AutopruneError(f"study {study.study_name!r} has no finished trial yet; run the search first")
        return study.best_trial
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found or found[0].state != optuna.trial.TrialState.COMPLETE:
        raise AutopruneError(f"study {study.study_name!r} has no finished trial {number}")
    return found[0]


def trials_table(study: optuna.Study):
    """Every trial as a DataFrame row (the plan left out: it lives in plan.json and the study)."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "duration",
                                          "params", "user_attrs"))
    return frame.drop(columns=[c for c in frame.columns if c == "user_attrs_plan"])


def config_dict(**values: Any) -> dict[str, Any]:
    """JSON-safe configuration for storing on a study."""
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v))
            for k, v in values.items()}

