"""The Python API: ``search`` a model for a budget, ``export_trial`` a stored study's trial, ``load_pruned``
what they wrote.

``search`` reads as the stages it runs, each in its subpackage: :mod:`autoprune.study.pipeline`
prepares the base model, its groups and the budget, :mod:`autoprune.study.sensitivity` scans,
:mod:`autoprune.study.trials` or :mod:`autoprune.study.halving` searches, :mod:`autoprune.export.final`
writes the winner.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autoprune.cost.budget import Budget, BudgetRange, parse_budget, steps
from autoprune.cost.costmodel import CostModel
from autoprune.cost.latency import LatencySettings, Meter, with_device
from autoprune.errors import AutopruneError
from autoprune.export.final import export_stored, finish_search
from autoprune.export.formats import deploy
from autoprune.files import command_line, fingerprint, versions, write_json
from autoprune.inputs.data import Data
from autoprune.inputs.models import build_model, read_state_dict
from autoprune.inputs.task import Task, zeros_like_input
from autoprune.options import DEFAULTS, EXPORT_DEFAULTS, ExportOptions, SearchOptions
from autoprune.prune.groups import apply_plan
from autoprune.prune.plan import Plan
from autoprune.report.pareto import best_under
from autoprune.study.halving import SCAN_SHARE, Deadline, parse_duration, races, search_by_the_clock
from autoprune.study.pipeline import (Prepared, Result, as_data, base_line, bounded_problem, budget_limits,
                                      distill_outputs, distillation, extra_settings, find_groups, prepare,
                                      range_targets, refuse_before_training, score_base)
from autoprune.study.runs import open_run, rebuild_problem, start_study
from autoprune.study.sensitivity import scan
from autoprune.study.space import SearchSpace, for_search, resolve
from autoprune.study.storage import SharedTable
from autoprune.study.trials import Settings, best_trial, counted_search, run
from autoprune.study.weights import search_weights
from autoprune.study.workers import sampler_stream


def search(
    model: nn.Module | str,
    data: Data | str | Sequence[Dataset | DataLoader],
    budget: str | Budget | BudgetRange = "flops=0.3",
    options: SearchOptions | None = None,
    *,
    _worker: int = 0,
    **changes: Any,
) -> Result | None:
    """Find per-group pruning ratios that meet ``budget`` and keep the most accuracy.

    ``model`` is a trained ``nn.Module`` or a model name (torchvision name,
    ``package.module:factory``, ``file.py:factory``); a named model without
    ``weights`` is trained first and kept in the run directory. ``data`` is a data
    set name or ``(train, val, test)`` datasets or loaders. ``budget`` caps FLOPs
    (thop MACs), params or latency: ``"flops=0.3"`` (a share of the base),
    ``"params=1.5M"``, ``"latency=3ms"`` (timed here, :mod:`autoprune.cost.latency`),
    several joined by commas, or a range, ``"flops=0.05..0.5"``, that searches the
    whole trade-off in one study over :data:`~autoprune.cost.budget.STRATA` log-spaced
    targets and exports the most accurate trial at its upper end
    (``export_trial(at=...)`` exports any other point).

    Everything else is a :class:`~autoprune.options.SearchOptions` field, passed as
    ``options``, as keywords, or both (keywords win): see it for what each does.
    Running the same search again resumes its study; ``trials`` is the total to reach.

    Example:
        >>> result = autoprune.search("resnet18", "digits", "flops=0.25", trials=12)
        >>> result.summary["flops_share"] <= 0.25
        True
    """
    started = time.perf_counter()
    o = (options or DEFAULTS).replace(**changes)
    o.check()
    torch.manual_seed(o.seed)
    extra_settings(o)  # refuses bad distillation or soft-pruning numbers before any work
    _refuse_range(budget, o)
    if o.granularity == "weight":
        return _weight_search(model, data, budget, o)
    budget = parse_budget(budget)
    latency = LatencySettings(o.latency_backend, o.latency_batch, o.latency_threads)
    seconds = _time_budget(o)
    space = for_search(model, o)
    r = prepare(model, data, budget, o, before_training=refuse_before_training(space, budget, o))
    deadline = Deadline(seconds) if seconds else None  # the time budget counts from here
    o = distillation(r, o)
    settings = replace(Settings.of(o, extra_settings(o)), race=races(seconds or 0.0, o.race))  # race: time budgets
    groups = find_groups(r.base, r.data.example_input(), space, r.data, o.batch_size, o.seed, base_model=r.base_id,
                         device=r.device)
    latency = with_device(latency, r.device, r.data.input_shape, isinstance(r.data.example_input(), list))
    meter = Meter(r.base, latency, o.latency_timer)
    costs, limits = budget_limits(groups, budget, space, meter)
    the_study = start_study(r, budget, space, o, settings, latency)
    base = score_base(r.base, r.data, r.device)
    if not o.quiet:
        print(base_line(r, base.val, costs, groups, budget, limits))
    table = scan(groups, costs, r.base, r.data, base.score, r.device, r.out / "sensitivity.csv", space.grid,
                 o.bn_batches, o.batch_size, o.quiet, round_to=space.round_to, shared=SharedTable(the_study),
                 seconds=SCAN_SHARE * deadline.left() if deadline else None)
    problem = bounded_problem(r.base, r.data, groups, costs, table, space, limits, base.val, r.device,
                              range_targets(budget, costs), checkpoints=r.out / "checkpoints", meter=meter,
                              teacher_outputs=distill_outputs(r, o))
    stream = sampler_stream(r.shared)
    if _worker:
        run(problem, the_study, settings, True, stream + 100003 * _worker)
        return None
    if deadline:
        chosen, settings = search_by_the_clock(problem, the_study, settings, deadline, base.per_image, o.quiet)
    else:
        chosen = counted_search(problem, the_study, settings, o.quiet, stream, o.workers, search,
                                _worker_call(model, data, budget, o, r))
    return finish_search(problem, the_study, chosen, settings, o.quiet, started, budget, limits, r, seconds)


def _refuse_range(budget: str | Budget | BudgetRange, o: SearchOptions) -> None:
    """A budget range is searched by trial count on channels only."""
    if ".." in str(budget) and (o.granularity == "weight" or o.time_budget is not None):
        what = "--granularity weight" if o.granularity == "weight" else "--time-budget"
        raise AutopruneError(f"a budget range is searched by trial count on channels only; "
                             f"leave out {what} or give one budget, e.g. flops=0.25")


def _time_budget(o: SearchOptions) -> float | None:
    """The time budget in seconds (None: none), which plans one process's time."""
    seconds = parse_duration(o.time_budget) if o.time_budget is not None else None
    if seconds and o.workers > 1:
        raise AutopruneError("--time-budget plans one process's time; leave out --workers (or --time-budget)")
    return seconds


def _worker_call(model: nn.Module | str, data: Any, budget: Budget | BudgetRange, o: SearchOptions,
                 r: Prepared) -> tuple:
    """The arguments of :func:`search` in each worker process: the same search on the prepared base model
    and study (named data, and --task, each worker loads itself)."""
    worker = o.replace(storage=r.storage, out=r.out, study=r.study, new_study=False, workers=1, quiet=True,
                       **({} if isinstance(model, str) else {"weights": None, "train_epochs": 0.0}))
    return (model if isinstance(model, str) else r.base, data if isinstance(data, (str, Path)) else r.data,
            budget, worker)


def _weight_search(model: nn.Module | str, data: Any, budget: Any, o: SearchOptions) -> Result:
    """The weight-level search, refusing the options it does not take."""
    for given, flag, why in ((o.workers > 1, "--workers", "runs channel searches only"),
                             (o.pruner is not None, "--pruner", "stops channel-search trials only"),
                             (o.time_budget is not None, "--time-budget", "plans channel searches only"),
                             (o.soft_epochs > 0, "--soft-epochs", "prunes channels")):
        if given:  # e.g. --workers: the weight search's trial loop has no heartbeat or dead-worker recovery
            raise AutopruneError(f"{flag} {why}; leave it out with --granularity weight")
    return search_weights(model, data, budget, o)


def load_pruned(
    plan: str | Path | Plan,
    model: nn.Module | str | None = None,
    weights: str | Path | None = "auto",
) -> nn.Module:
    """Rebuild a pruned model from its plan, without unpickling any code.

    ``plan`` is a run directory, a ``plan.json`` or a :class:`Plan`; ``model`` the
    base model (an ``nn.Module`` or a model name; by default the one the plan
    records). ``weights="auto"`` loads the fine-tuned ``weights.pt`` beside the
    plan; ``None`` keeps the base model's own weights, which must be those the
    plan was made from.

    Example:
        >>> pruned = autoprune.load_pruned("results/resnet18-digits-flops0.25")
    """
    folder = None
    if not isinstance(plan, Plan):
        path = Path(plan)
        folder = path if path.is_dir() else path.parent
        plan = Plan.load(path / "plan.json" if path.is_dir() else path)
    meta = plan.meta
    if model is None or isinstance(model, str):
        spec = model or meta.get("model")
        if not spec or "num_classes" not in meta:
            raise AutopruneError("the plan does not record its model; pass the base model as model=")
        model = build_model(spec, meta["num_classes"] and int(meta["num_classes"]), input_shape=meta.get("input_shape"))
    if weights == "auto":
        weights = folder / "weights.pt" if folder and (folder / "weights.pt").is_file() else None
    if weights is None and plan.base_model and fingerprint(model.state_dict()) != plan.base_model:
        raise AutopruneError("the model's weights are not the base weights this plan was made from; "
                             "load the base weights first or pass weights= for the pruned model")
    pruned = apply_plan(model, plan, zeros_like_input(meta))
    if weights is not None:
        pruned.load_state_dict(read_state_dict(weights))
    return pruned.eval()


def export_trial(study: str, options: ExportOptions | None = None, **changes: Any) -> dict[str, Any]:
    """Rebuild a trial of a stored study (default: the best), fine-tune, test and write it.

    Writes ``model.pt``, ``weights.pt``, ``plan.json`` and ``summary.json`` into
    ``out`` (default ``RUN_DIR/trial-N``); ``formats`` adds ``model.onnx``
    and/or ``model.torchscript.pt``, each checked against the PyTorch outputs;
    ``quantize="dynamic"`` adds an int8 copy (``model-int8.pt``) with its size,
    accuracy and latency. The summary holds the CPU latency (median of ``repeats`` runs, ms,
    ``threads`` intra-op threads) of base and pruned models at each of ``latency_batches``.
    ``at`` (``"flops=0.2"``, ``"params=1M"``) picks the most accurate trial at or under that point:
    on a range study, any point of the trade-off.

    Everything but the study is an :class:`~autoprune.options.ExportOptions` field, passed as
    ``options``, as keywords, or both (keywords win): see it for what each does.

    Example:
        >>> summary = autoprune.export_trial("resnet18-digits-flops0.25", formats=["onnx"], quantize="dynamic")
        >>> summary["latency_ms"]["pruned"]["1"] < summary["latency_ms"]["base"]["1"]
        True
        >>> autoprune.export_trial("resnet18-digits-flops0.05..0.5", at="flops=0.2")["flops_share"] <= 0.2
        True
    """
    if isinstance(options, int):  # export_trial(study, 3): the trial, the second argument before ExportOptions
        options, changes = None, {"trial": options, **changes}
    o = (options or EXPORT_DEFAULTS).replace(**changes)
    o.check()
    started = time.perf_counter()
    run = open_run(study, o.storage, o.run_dir)
    if o.at is not None and o.trial is not None:
        raise AutopruneError("give a trial number or a point to export at (--flops/--params), not both")
    chosen = best_trial(run.study, best_under(run, o.at) if o.at is not None else o.trial)
    problem = rebuild_problem(run, o.data_dir, o.download, o.device, o.task)
    out = Path(o.out) if o.out else run.folder / f"trial-{chosen.number}"
    summary = export_stored(run, problem, chosen, out, o.final_epochs, o.quiet)
    pruned = torch.load(out / "model.pt", weights_only=False).eval()
    summary.update(deploy(problem.model, pruned, problem.data, out, o, run.config))
    summary.update(seconds=round(time.perf_counter() - started, 1), command=command_line(), versions=versions())
    write_json(out / "summary.json", summary)
    return summary


def describe_groups(
    model: nn.Module | str,
    data: Data | str | Sequence[Dataset | DataLoader] = "digits",
    space: SearchSpace | str | Path | None = None,
    importance: str | None = None,
    data_dir: str | Path = "data",
    download: bool = False,
    task: Task | str | None = None,
) -> str:
    """A table of the prunable groups a search space is written against (``task`` as in :func:`search`).

    One row per group: its id (what ``bounds`` patterns match), channels, the
    channel step it moves in (``round_to`` and its blocks), its share of the FLOPs (what pruning it to one
    block saves) and its layers.

    Example:
        >>> print(autoprune.api.describe_groups("resnet18"))
        resnet18 on digits (1, 3, 32, 32): 37.2M FLOPs (thop MACs), 11.2M params | space resnet …
    """
    data = as_data(data, task, data_dir=data_dir, download=download)
    space = resolve(space, model).replace(importance=importance)
    base = build_model(model, data.num_classes, input_shape=data.input_shape) if isinstance(model, str) else model
    base = base.eval()
    example = data.example_input()
    groups = find_groups(base, example, space, data, DEFAULTS.batch_size, 0, importance="l1")
    space.check_groups(groups.ids)
    costs = CostModel(groups)
    low, high = space.ratio_bounds(groups.ids)
    step = steps(costs, space.round_to).astype(int)
    name = model if isinstance(model, str) else type(model).__name__
    lines = [f"{name} on {data.name} {(1, *data.input_shape)}: {costs.base} | space {space.name} "
             f"({space.source or 'given'}) | {len(groups)} prunable groups",
             f"{'group':40s} {'channels':>8s} {'step':>4s} {'FLOPs share':>11s} {'ratio bounds':>12s}  layers"]
    for group, lo, hi, by in zip(groups, low, high, step):
        saved = costs.carried_flops(group.id)
        layers = ", ".join(group.layers[:3]) + (f" (+{len(group.layers) - 3} more)" if len(group.layers) > 3 else "")
        lines.append(f"{group.id:40s} {group.channels:8d} {by:4d} {saved / costs.base.flops:11.1%} "
                     f"{f'{lo:.2f}–{hi:.2f}':>12s}  {layers}")
    return "\n".join(lines)
