"""The Optuna search over per-group pruning ratios.

A trial picks one ratio per group within the bounds sensitivity allows; the
pick is projected onto the budget before anything is trained (no candidate is
ever over budget, none wastes much of it), the pruned model is fine-tuned
briefly and scored on validation data. Plan, FLOPs, params and accuracy are
stored on the trial, so the study alone is the record of the search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import fit_plan, usage
from .costmodel import CostModel
from .counting import Cost, human
from .data import Data
from .distill import from_settings
from .errors import AutopruneError
from .groups import ChannelGroups
from .plan import Plan
from .training import evaluate, recalibrate_bn, train

optuna.logging.set_verbosity(optuna.logging.WARNING)


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


@dataclass
class Settings:
    """How the search trains and scores candidates (recorded with the study)."""

    trials: int = 12
    finetune_epochs: float = 1.0
    final_epochs: float = 5.0
    lr: float = 0.01
    batch_size: int = 64
    bn_batches: int = 8
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def storage_for(url: str) -> optuna.storages.BaseStorage | str:
    """An Optuna storage for ``url``; databases get heartbeats so a killed trial is retried."""
    if url.startswith(("sqlite", "postgresql", "mysql")):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=20, grace_period=60,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    if url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    raise AutopruneError(f"unknown storage {url!r}; use sqlite:///file.db, postgresql://…, "
                         "mysql://… or a journal file ending in .log")


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


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _param(gid: str) -> str:
    return f"ratio:{gid}"


def trial_plan(trial: optuna.trial.FrozenTrial) -> Plan:
    """The plan a finished trial trained."""
    return Plan.from_dict(trial.user_attrs["plan"])


class Objective:
    """One trial: sample ratios, fit them to the budget, fine-tune, score."""

    def __init__(self, problem: Problem, settings: Settings, quiet: bool) -> None:
        self.problem, self.settings, self.quiet = problem, settings, quiet

    def __call__(self, trial: optuna.Trial) -> float:
        p, s = self.problem, self.settings
        start = time.perf_counter()
        ratios = np.array([trial.suggest_float(_param(gid), float(lo), float(hi))
                           for gid, lo, hi in zip(p.costs.ids, p.low, p.high)])
        plan, model, cost = fit_plan(p.groups, p.costs, ratios, p.limits, p.low, p.high, p.round_to)
        base = p.costs.base
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("flops", cost.flops)
        trial.set_user_attr("params", cost.params)
        trial.set_user_attr("flops_share", cost.flops / base.flops)
        trial.set_user_attr("params_share", cost.params / base.params)
        trial.set_constraint("budget", usage(cost, p.limits) - 1.0)
        torch.manual_seed(s.seed + trial.number)
        train_loader = p.data.loader("train", s.batch_size, shuffle=True, seed=s.seed + trial.number)
        val_loader = p.data.loader("val", 256)
        model.to(p.device)
        recalibrate_bn(model, train_loader, p.device, s.bn_batches)
        trial.set_user_attr("val_accuracy_before_finetune", evaluate(model, val_loader, p.device))
        train(model, train_loader, s.finetune_epochs, p.device, lr=s.lr, desc=f"trial {trial.number}",
              quiet=self.quiet, distill=from_settings(p.model, s.extra))
        accuracy = evaluate(model, val_loader, p.device)
        trial.set_user_attr("val_accuracy", accuracy)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        return accuracy


def _describe(trial: optuna.trial.FrozenTrial, study: optuna.Study) -> str:
    attrs = trial.user_attrs
    best = study.best_trial
    return (f"trial {trial.number}: val {attrs['val_accuracy']:.2%} "
            f"(before fine-tune {attrs['val_accuracy_before_finetune']:.2%}) | "
            f"FLOPs {human(attrs['flops'])} ({attrs['flops_share']:.1%} of base, thop MACs) | "
            f"params {human(attrs['params'])} ({attrs['params_share']:.1%}) | {attrs['seconds']:.1f}s | "
            f"best {best.value:.2%} (trial {best.number})")


def run(problem: Problem, study: optuna.Study, settings: Settings, quiet: bool = False) -> optuna.Study:
    """Run trials until the study holds ``settings.trials`` finished ones."""
    done = finished(study)
    if done >= settings.trials:
        return study
    if not study.trials:  # the sensitivity seed goes first, once
        study.enqueue_trial({_param(g): float(r) for g, r in zip(problem.costs.ids, problem.seed_ratios)})
    # A fixed seed would make a resumed study repeat its first trials: offset it.
    study.sampler = optuna.samplers.TPESampler(
        seed=settings.seed + len(study.trials), multivariate=True,
        n_startup_trials=max(3, min(10, settings.trials // 4)),
    )
    bar = tqdm(total=settings.trials, initial=done, desc="search", unit="trial", disable=quiet)

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            bar.update(1)
            if not quiet:
                tqdm.write(_describe(trial, study))
        if finished(study) >= settings.trials:
            study.stop()

    try:
        while finished(study) < settings.trials:
            study.optimize(Objective(problem, settings, quiet), n_trials=settings.trials - finished(study),
                           callbacks=[report], gc_after_trial=False)
    finally:
        bar.close()
    return study


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

