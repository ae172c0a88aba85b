"""Rebuild the chosen plan, fine-tune it longer, test it once, and write it out: at the end of a
search (:func:`finish_search`) or later, from its stored study (:func:`export_stored`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from autoprune.cost.budget import Budget, BudgetRange
from autoprune.cost.latency import ATTRS as LATENCY_ATTRS, Meter, check_budget
from autoprune.counting import Cost, count
from autoprune.files import command_line, save_torch, versions, write_json, write_text
from autoprune.inputs.data import Data
from autoprune.inputs.models import absolute_spec, read_state_dict
from autoprune.inputs.task import input_kind
from autoprune.options import DEFAULTS
from autoprune.prune.groups import apply_plan
from autoprune.prune.plan import Plan
from autoprune.study.pipeline import Prepared, Result
from autoprune.study.runs import Run, final_extra
from autoprune.study.trials import Problem, Settings, checkpoint, count_pruned, ended, trial_plan, trials_table
from autoprune.train.distill import from_settings
from autoprune.train.loop import evaluate, recalibrate_bn, train
from autoprune.train.soft import soft_prune

EXPORT_KEYS = ("study", "trial", "base_model", "final_epochs", "distill", "soft_epochs", "warm_start")


def finetune(problem: Problem, plan: Plan, settings: Settings, start: Path | None = None,
             quiet: bool = True) -> tuple[nn.Module, Plan, float]:
    """The final recipe: cut the plan, recalibrate BatchNorm, fine-tune ``settings.final_epochs``
    (or for ``settings.final_seconds``, where set).

    ``start`` holds the fine-tuned weights of the trial that found ``plan``
    (:func:`autoprune.study.trials.checkpoint`): the fine-tune goes on from them rather
    than from the cut base model, so the search's training is not thrown away.
    Soft pruning re-selects the channels from the base model and ignores ``start``.
    Returns the model, the plan (soft pruning records which channels it kept)
    and the epochs the final fine-tune trained.
    """
    p, s = problem, settings
    device = p.device
    train_loader = p.data.loader("train", s.batch_size, shuffle=True, seed=s.seed)
    torch.manual_seed(s.seed)
    if s.extra.get("soft_epochs"):
        trained, plan = soft_prune(p.model, p.groups, plan, train_loader, s.extra["soft_epochs"], device,
                                   s.lr, quiet, from_settings(p.model, s.extra, p.teacher_outputs), task=p.data.task)
        model = apply_plan(trained, plan, p.groups.example_input).to(device)
    else:
        model = p.groups.apply(plan)
        if start is not None:
            model.load_state_dict(read_state_dict(start))
        model.to(device)
    recalibrate_bn(model, train_loader, device, s.bn_batches, task=p.data.task)
    steps = [0]

    def counted(_: nn.Module) -> None:
        steps[0] += 1

    train(model, train_loader, s.final_epochs, device, lr=s.lr, desc="final fine-tune", quiet=quiet,
          distill=from_settings(p.model, s.extra, p.teacher_outputs), after_step=counted,
          seconds=s.final_seconds or None, task=p.data.task)
    return model, plan, steps[0] / len(train_loader)


def export(problem: Problem, plan: Plan, out: Path, settings: Settings, quiet: bool = False,
           start: Path | None = None, **summary: Any) -> dict[str, Any]:
    """Write ``model.pt``, ``weights.pt``, ``plan.json`` and ``summary.json`` into ``out``.

    ``model.pt`` is the pruned ``nn.Module`` (``torch.load(..., weights_only=False)``);
    ``weights.pt`` its state dict, which with ``plan.json`` rebuilds it through
    :func:`autoprune.load_pruned` without unpickling code. ``start``: see
    :func:`finetune`. Returns the summary.
    """
    p, data, device = problem, problem.data, problem.device
    model, plan, epochs = finetune(p, plan, settings, start, quiet)
    val_accuracy = evaluate(model, data.loader("val", 256), device, data.task)
    # No search stage reads the test split: export reads it, once for the base, once for the winner.
    test_loader = data.loader("test", 256)
    base_test = evaluate(p.model, test_loader, device, data.task)
    test_accuracy = evaluate(model, test_loader, device, data.task)
    cost = count(model, p.groups.example_input)
    base = p.costs.base
    model = model.cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    save_torch(model, out / "model.pt")
    save_torch(model.state_dict(), out / "weights.pt")
    plan.save(out / "plan.json")
    result = {
        "base_flops": base.flops, "base_params": base.params,
        "flops": cost.flops, "params": cost.params,
        "flops_share": cost.flops / base.flops, "params_share": cost.params / base.params,
        "flops_unit": "thop MACs",
        "base_val_accuracy": p.base_val_accuracy, "val_accuracy": val_accuracy,
        "base_test_accuracy": base_test, "test_accuracy": test_accuracy,
        "score": data.task.name, "score_format": data.task.format,  # what the *_accuracy values are
        **summary,
        "final_epochs": round(epochs, 3),  # as trained: a time budget's fine-tune ends by the clock
    }
    write_json(out / "summary.json", result)
    return result


def exported_plan(chosen: optuna.trial.FrozenTrial, model: str, data: Data, study: str) -> Plan:
    """Trial ``chosen``'s plan, recording what :func:`autoprune.load_pruned` needs to rebuild it."""
    found = trial_plan(chosen)
    meta = {"model": model, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            **input_kind(data.example_input()), "dataset": data.name, "study": study, "trial": chosen.number}
    return Plan(found.kept, found.channels, found.importance, found.base_model, meta)


def warm_start(folder: Path, number: int, extra: dict[str, Any]) -> Path | None:
    """The chosen trial's fine-tuned weights, if this machine ran it (and soft pruning will not redo it)."""
    path = checkpoint(folder, number)
    return path if path.is_file() and not extra.get("soft_epochs") else None


def finish_search(problem: Problem, study: optuna.Study, chosen: optuna.trial.FrozenTrial, settings: Settings,
                  quiet: bool, started: float, budget: Budget | BudgetRange, limits: Cost, run: Prepared,
                  time_budget: float | None = None) -> Result:
    """Export the chosen trial (once), write the trials table and the summary, and hand back the result."""
    data, out, extra = run.data, run.out, settings.extra
    plan = exported_plan(chosen, absolute_spec(run.name), data, run.study)
    write_text(out / "trials.csv", trials_table(study).to_csv(index=False))
    start = warm_start(problem.checkpoints, chosen.number, extra)
    record = dict(budget=str(budget), budget_flops=limits.flops, budget_params=limits.params,
                  trial=chosen.number, trial_val_accuracy=chosen.value, trials=ended(study),
                  pruned_trials=count_pruned(study),
                  final_epochs=round(settings.final_epochs, 3), model=run.name, base_model=run.base_id,
                  dataset=data.name, study=run.study, storage=run.storage, device=str(run.device),
                  input_shape=list(data.input_shape),
                  warm_start=start and str(start.relative_to(out)), **extra,
                  **_latency_record(chosen, limits, problem.meter))
    if time_budget:  # a rerun keeps the export it planned, not one planned anew
        record.update(time_budget_seconds=time_budget, race=settings.race)
        previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        if all(previous.get(k) == record[k] for k in ("study", "trial", "time_budget_seconds")):
            record["final_epochs"] = previous.get("final_epochs", record["final_epochs"])
            settings = replace(settings, final_epochs=record["final_epochs"], final_seconds=0.0)
    summary = _export_once(problem, plan, out, settings, quiet, record, start)
    pruned = torch.load(out / "model.pt", weights_only=False)
    if problem.meter is not None and math.isfinite(limits.latency):  # re-timed afresh, as exported
        summary["latency_check"] = check_budget(problem.model, pruned, budget, problem.meter.settings,
                                                problem.meter.timer)
    summary.update(seconds=round(time.perf_counter() - started, 1), command=command_line(), versions=versions())
    write_json(out / "summary.json", summary)
    return Result(pruned, plan, summary, study, out)


def _latency_record(chosen: optuna.trial.FrozenTrial, limits: Cost, meter: Meter | None) -> dict[str, Any]:
    """The chosen trial's latency for the summary, under ``latency``: as measured in the search
    (``ms``, ``spread_ms``, ``share``, ``predicted_ms``), the base's, the cap and the settings."""
    found = {k.removeprefix("latency_"): chosen.user_attrs[k] for k in LATENCY_ATTRS if k in chosen.user_attrs}
    if meter is not None:
        found.update(base_ms=meter.base_ms, base_spread_ms=meter.base_spread_ms, **meter.settings.config())
    if math.isfinite(limits.latency):
        found["budget_ms"] = limits.latency
    return {"latency": found} if found else {}


def _export_once(problem: Problem, plan: Plan, out: Path, settings: Settings, quiet: bool,
                 record: dict[str, Any], start: Path | None) -> dict[str, Any]:
    """Export the chosen trial, unless this run directory already holds exactly that export."""
    previous = out / "summary.json"
    files = [out / f for f in ("model.pt", "weights.pt", "plan.json")]
    if previous.is_file() and all(f.is_file() for f in files):
        summary = json.loads(previous.read_text())
        if all(summary.get(k) == record.get(k) for k in EXPORT_KEYS):
            return {**summary, **record}
    return export(problem, plan, out, settings, quiet, start, **record)


def export_stored(run: Run, problem: Problem, chosen: optuna.trial.FrozenTrial, out: Path, final_epochs: float,
                  quiet: bool = False) -> dict[str, Any]:
    """Export trial ``chosen`` of a stored study (``problem`` rebuilt from it), fine-tuned as its search's
    final fine-tune was but for ``final_epochs``; the summary."""
    config, data = run.config, problem.data
    extra = final_extra(run.study)
    stored = DEFAULTS.replace(**{k: config[k] for k in ("finetune_epochs", "lr", "batch_size", "bn_batches", "seed")
                                 if k in config})  # as the search trained (older studies lack some)
    settings = replace(Settings.of(stored, extra), trials=0, final_epochs=final_epochs)
    plan = exported_plan(chosen, run.model, data, run.name)
    start = warm_start(run.folder / "checkpoints", chosen.number, extra)
    record = dict(budget=config["budget"], budget_flops=problem.limits.flops, budget_params=problem.limits.params,
                  trial=chosen.number, trial_val_accuracy=chosen.value, trials=ended(run.study),
                  final_epochs=final_epochs, model=config["model"], base_model=config["base_model"],
                  dataset=data.name, study=run.name, storage=run.storage, device=str(problem.device),
                  input_shape=list(data.input_shape),
                  warm_start=start and str(start.relative_to(run.folder)), **extra)
    return export(problem, plan, out, settings, quiet, start, **record)
