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

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from autoprune.cost.budget import NoFit, fit_plan, usage
from autoprune.cost.costmodel import CostModel
from autoprune.cost.latency import describe as describe_latency, trial_latency
from autoprune.counting import Cost, human
from autoprune.errors import AutopruneError
from autoprune.files import save_torch
from autoprune.inputs.data import Data
from autoprune.inputs.task import Score
from autoprune.options import DEFAULTS, SearchOptions
from autoprune.prune.groups import ChannelGroups
from autoprune.prune.plan import Plan
from autoprune.study.workers import (COMPLETE, ENDED, FAIL,  # noqa: F401 (states, as modules import them)
                                            POLL_S, PRUNED, RUNNING, heartbeat, hold_for_test, join_workers, recover,
                                            retry, share_cores, spawn_worker, surplus)
from autoprune.train.distill import from_settings
from autoprune.train.loop import evaluate, recalibrate_bn, train
from autoprune.train.teacher import TeacherOutputs

optuna.logging.set_verbosity(optuna.logging.WARNING)
# set_metric_names is marked experimental; the warning would only clutter every run's output.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

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
    teacher_outputs: TeacherOutputs | None = None  # the base's outputs on the training set, for --distill

    def limits_for(self, trial: optuna.Trial | optuna.trial.FrozenTrial) -> Cost:
        """The caps trial ``trial`` is projected onto: its stratum's in a range study."""
        stratum = trial.user_attrs.get("stratum")
        return self.limits if stratum is None or not self.strata else self.strata[stratum].limits


@dataclass
class Settings:
    """How the search trains and scores candidates (recorded with the study)."""

    trials: int = DEFAULTS.trials
    finetune_epochs: float = DEFAULTS.finetune_epochs
    final_epochs: float = DEFAULTS.final_epochs
    lr: float = DEFAULTS.lr
    batch_size: int = DEFAULTS.batch_size
    bn_batches: int = DEFAULTS.bn_batches
    seed: int = DEFAULTS.seed
    extra: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"  # or "none": every trial is fine-tuned to the end
    trial_bn_batches: int = 2  # BatchNorm recalibration before a trial's cheap score
    checks: int = 1  # validation checks (chances to be pruned) during a trial's fine-tune
    final_seconds: float = 0.0  # with a time budget: the final fine-tune trains this long, not final_epochs
    race: bool = True  # with a time budget: race candidates, or only check the seed against uniform (halving.races)

    @classmethod
    def of(cls, options: SearchOptions, extra: dict[str, Any]) -> Settings:
        """The trial recipe a search's ``options`` give, with its optional fine-tune modes ``extra``."""
        o = options
        return cls(o.trials, o.finetune_epochs, o.final_epochs, o.lr, o.batch_size, o.bn_batches, o.seed, extra,
                   o.pruner or "median")

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


def finished(study: optuna.Study) -> int:
    """How many trials finished (fine-tuned and scored; pruned ones not counted)."""
    return len(study.get_trials(deepcopy=False, states=(COMPLETE,)))


def ended(study: optuna.Study) -> int:
    """Trials that count towards the trials asked for: a failed one (killed, retried) does not."""
    return len(study.get_trials(deepcopy=False, states=ENDED))


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
    halving (:mod:`autoprune.study.halving`) calls :meth:`advance` once per rung.
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
        try:
            plan, model, cost = fit_plan(p.groups, p.costs, ratios, limits, p.low, p.high, p.round_to)
        except NoFit as err:  # built and timed over the cap however tightened: drop it, go on with the next
            trial.set_user_attr("no_fit", str(err))
            raise optuna.TrialPruned(str(err)) from None
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
        recalibrate_bn(model, self._train_loader(trial, 0), p.device, s.trial_bn_batches, task=p.data.task)
        clock = time.perf_counter()
        cheap = evaluate(model, p.data.loader("score", 256), p.device, p.data.task)
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
              quiet=self.quiet, distill=from_settings(p.model, s.extra, p.teacher_outputs), checks=checks,
              check=lambda tuned, k: self._report(trial, step - 1 + k, evaluate(tuned, score, p.device, p.data.task),
                                                  started), task=p.data.task)
        trained, clock = time.perf_counter() - clock, time.perf_counter()
        accuracy = evaluate(model, score, p.device, p.data.task)
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

    def _report(self, trial: optuna.Trial, step: int, accuracy: float, started: float) -> None:
        trial.report(accuracy, step)
        if trial.should_prune():
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            task = self.problem.data.task
            raise optuna.TrialPruned(f"val {task.name} {task.show(accuracy)} at step {step} is below the median")


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
    attrs, score = trial.user_attrs, Score.of(study.user_attrs)
    best = study.best_trial
    target = f" | target {attrs['target']}" + (" (uniform)" if attrs.get("reference") else "") \
        if "target" in attrs else ""
    return (f"trial {trial.number}{target}: val {score.name} {score.show(attrs['val_accuracy'])} "
            f"(before fine-tune {score.show(attrs['val_accuracy_before_finetune'])}) | "
            f"FLOPs {human(attrs['flops'])} ({attrs['flops_share']:.1%} of base, thop MACs) | "
            f"params {human(attrs['params'])} ({attrs['params_share']:.1%}){describe_latency(attrs)} | "
            f"{attrs['seconds']:.1f}s | "
            f"best {score.show(best.value)} (trial {best.number})")


def _describe_pruned(trial: optuna.trial.FrozenTrial, score: Score) -> str:
    if "no_fit" in trial.user_attrs:
        return f"trial {trial.number}: dropped: {trial.user_attrs['no_fit']}"
    step = trial.last_step
    when = "before fine-tuning (cheap score)" if step == 0 else f"at check {step} of the fine-tune"
    return (f"trial {trial.number}: pruned {when}: val {score.name} {score.show(trial.intermediate_values[step])} "
            f"below the median | {trial.user_attrs.get('seconds', 0):.1f}s")


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
            _run_next_trial(study, objective, settings.trials, quiet)
    finally:
        bar.close()
    return study


def counted_search(problem: Problem, study: optuna.Study, settings: Settings, quiet: bool, stream: int,
                   workers: int, worker: Callable[..., object], call: tuple) -> optuna.trial.FrozenTrial:
    """Run trials until the study holds ``settings.trials``, here and in ``workers - 1`` more processes, each
    running ``worker(*call, _worker=i)`` (the same search, as worker ``i`` of this study); the best trial."""
    enqueue_seed(study, problem)
    children = [spawn_worker(worker, call, i, workers) for i in range(1, workers)]
    try:
        with share_cores(workers):
            run(problem, study, settings, quiet, stream)
    except BaseException:
        join_workers(children, check=False)  # the error at hand is the one to report
        raise
    join_workers(children)
    return best_trial(study)


def _run_next_trial(study: optuna.Study, objective: Objective, wanted: int, quiet: bool) -> None:
    """Ask for a trial, run it unless it is surplus, and tell the study how it went."""
    trial = study.ask()
    reason = surplus(study, trial.number, wanted)
    if reason:
        trial.set_user_attr("skipped", reason)
        study.tell(trial, state=FAIL)
        return
    try:
        with heartbeat(study, trial._trial_id):
            hold_for_test(study)
            value = objective(trial)
    except optuna.TrialPruned:
        frozen = study.tell(trial, state=PRUNED)
        if not quiet:
            tqdm.write(_describe_pruned(frozen, Score.of(study.user_attrs)))
        keep_best_checkpoints(study, objective.problem.checkpoints)
        return
    except BaseException:
        study.tell(trial, state=FAIL)
        if not isinstance(sys.exc_info()[1], Exception):  # interrupted, not broken: try it again later
            retry(study, study.get_trials(deepcopy=False)[trial.number])
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

