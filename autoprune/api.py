"""The Python API: ``search`` a model for a budget, ``export_trial`` a stored study's trial, ``load_pruned``
what they wrote."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autoprune.cost.budget import STRATA, Budget, BudgetRange, check_prunes, check_reachable, parse_budget, steps
from autoprune.cost.costmodel import CostModel
from autoprune.cost.latency import (ATTRS as LATENCY_ATTRS, LatencySettings, Meter, check_budget, latency_costs,
                                    with_device)
from autoprune.counting import Cost, human
from autoprune.errors import AutopruneError
from autoprune.export.final import export, export_stored, exported_plan, warm_start
from autoprune.export.formats import deploy
from autoprune.files import command_line, fingerprint, save_torch, versions, write_json, write_text
from autoprune.inputs.data import Data
from autoprune.inputs.models import absolute_spec, build_model, read_state_dict
from autoprune.inputs.task import SCORE, Task, score_record, zeros_like_input
from autoprune.options import DEFAULTS, EXPORT_DEFAULTS, ExportOptions, SearchOptions
from autoprune.prune.groups import ChannelGroups, apply_plan
from autoprune.prune.plan import Plan
from autoprune.report.pareto import best_under
from autoprune.study.checks import claim_run
from autoprune.study.halving import SCAN_SHARE, Deadline, parse_duration, scoring_seconds, timed_search
from autoprune.study.pipeline import Prepared, Result, as_data, bounded_problem, find_groups, prepare
from autoprune.study.runs import FINAL_EXTRA, LATENCY_SETTINGS, open_run, rebuild_problem, record_run
from autoprune.study.sensitivity import scan
from autoprune.study.space import SearchSpace, resolve
from autoprune.study.storage import SharedTable, open_study
from autoprune.study.trials import (Problem, Settings, best_trial, config_dict, count_pruned, ended, enqueue_seed,
                                    run, trials_table)
from autoprune.study.weights import search_weights
from autoprune.train.distill import Distill
from autoprune.train.loop import evaluate


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
    extra = extra_settings(o)
    if ".." in str(budget) and (o.granularity == "weight" or o.time_budget is not None):
        what = "--granularity weight" if o.granularity == "weight" else "--time-budget"
        raise AutopruneError(f"a budget range is searched by trial count on channels only; "
                             f"leave out {what} or give one budget, e.g. flops=0.25")
    if o.granularity == "weight":
        return _weight_search(model, data, budget, o, extra)
    budget = parse_budget(budget)
    latency = LatencySettings(o.latency_backend, o.latency_batch, o.latency_threads)
    seconds = parse_duration(o.time_budget) if o.time_budget is not None else None
    if seconds and o.workers > 1:
        raise AutopruneError("--time-budget plans one process's time; leave out --workers (or --time-budget)")
    space = resolve(o.space, model).replace(grid=tuple(o.grid) if o.grid else None, max_ratio=o.max_ratio,
                                            importance=o.importance, round_to=o.round_to)

    def refuse_early(base: nn.Module, data: Data) -> None:  # a bad space or budget, before training
        groups = find_groups(base, data.example_input(), space, data, o.batch_size, o.seed, importance="l1")
        _budget_limits(groups, budget, space)

    r = prepare(model, data, budget, o, before_training=refuse_early)
    named = data if isinstance(data, (str, Path)) else None  # workers load named data (and --task) themselves
    data, out, base, device = r.data, r.out, r.base, r.device
    deadline = Deadline(seconds) if seconds else None  # the time budget counts from here
    settings = Settings.of(o, extra)
    groups = find_groups(base, data.example_input(), space, data, o.batch_size, o.seed, base_model=r.base_id,
                         device=device)
    latency = with_device(latency, device, data.input_shape, isinstance(data.example_input(), list))
    meter = Meter(base, latency, o.latency_timer)
    costs, limits = _budget_limits(groups, budget, space, meter)
    config = config_dict(model=r.name, base_model=r.base_id, dataset=data.name, budget=str(budget),
                         importance=space.importance, grid=[float(g) for g in space.grid],
                         max_ratio=space.max_ratio, space=space.to_dict(),
                         finetune_epochs=o.finetune_epochs, lr=o.lr, batch_size=o.batch_size,
                         bn_batches=o.bn_batches, seed=o.seed, pruner=settings.pruner,
                         **({} if data.task.is_classification else {"task": data.task.label}),  # absent: classification
                         **(latency.config() if budget.latency is not None else {}),  # absent: older studies resume
                         **{k: v for k, v in extra.items() if k == "distill"},  # soft pruning: export only
                         **({"strata": STRATA} if isinstance(budget, BudgetRange) else {}))
    claim_run(out, r.study)
    the_study = open_study(r.study, r.storage, config, new=o.new_study)
    the_study.set_user_attr(FINAL_EXTRA, extra)  # so `export` fine-tunes as this run's final fine-tune does
    the_study.set_user_attr(LATENCY_SETTINGS, latency.config())  # what the trials' latencies mean
    the_study.set_user_attr(SCORE, score_record(data.task))  # what the trials' values are, for pareto and report
    record_run(the_study, out, r.name)
    if not (out / "base.pt").is_file():
        save_torch(base.state_dict(), out / "base.pt")
    clock = time.perf_counter()
    base_val = evaluate(base, data.loader("val", 256), device, data.task)
    base_eval = (time.perf_counter() - clock) / len(data.val)  # seconds per image, for planning
    if not o.quiet:
        caps = ", ".join(f"≤ {human(cap)} {what}" for cap, what in
                         ((limits.flops, "FLOPs"), (limits.params, "params")) if cap < float("inf"))
        caps += f"{', ' if caps else ''}≤ {limits.latency:.3g} ms" if limits.latency < float("inf") else ""
        print(f"base {r.name} on {data.name}: val {data.task.name} {data.task.show(base_val)} | {costs.base} | "
              f"{len(groups)} groups | "
              f"budget {budget}: {caps}")
    base_score = evaluate(base, data.loader("score", 256), device, data.task) \
        if len(data.score) < len(data.val) else base_val
    table = scan(groups, costs, base, data, base_score, device, out / "sensitivity.csv", space.grid,
                 o.bn_batches, o.batch_size, o.quiet, round_to=space.round_to, shared=SharedTable(the_study),
                 seconds=SCAN_SHARE * deadline.left() if deadline else None)
    targets = [(str(b), b.limits(costs.base)) for b in budget.targets(STRATA)] \
        if isinstance(budget, BudgetRange) else []
    problem = bounded_problem(base, data, groups, costs, table, space, limits, base_val, device, targets,
                              checkpoints=out / "checkpoints", meter=meter)
    # Workers on other machines must not draw the same candidates: give each process its own stream.
    stream = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) if r.shared else 0
    if _worker:
        run(problem, the_study, settings, True, stream + 100003 * _worker)
        return None
    finish = dict(budget=budget, limits=limits, run=r, extra=extra)
    if deadline:
        reserve = scoring_seconds(base_eval, data) + base_eval * len(data.test) + 2.0  # the base is tested too
        chosen, seconds_left = timed_search(problem, the_study, settings, deadline, reserve, o.quiet)
        # The final fine-tune trains by the clock (an epoch-time estimate would end early or late), or not at all.
        settings = replace(settings, final_epochs=0.0, final_seconds=seconds_left)
        return _finish(problem, the_study, chosen, settings, o.quiet, started, time_budget=seconds, **finish)
    enqueue_seed(the_study, problem)
    # Each worker runs the same search on the prepared base model and study.
    worker = o.replace(storage=r.storage, out=out, study=r.study, new_study=False, workers=1, quiet=True,
                       **({} if isinstance(model, str) else {"weights": None, "train_epochs": 0.0}))
    children = [_spawn(model if isinstance(model, str) else base, named or data, budget, worker, i, o.workers)
                for i in range(1, o.workers)]
    try:
        with _threads(o.workers):
            run(problem, the_study, settings, o.quiet, stream)
    except BaseException:
        _join(children, check=False)  # the error at hand is the one to report
        raise
    _join(children)
    return _finish(problem, the_study, best_trial(the_study), settings, o.quiet, started, **finish)


def _weight_search(model: nn.Module | str, data: Any, budget: Any, o: SearchOptions,
                   extra: dict[str, Any]) -> Result:
    """The weight-level search, refusing the options it does not take."""
    for given, flag, why in ((o.workers > 1, "--workers", "runs channel searches only"),
                             (o.pruner is not None, "--pruner", "stops channel-search trials only"),
                             (o.time_budget is not None, "--time-budget", "plans channel searches only"),
                             (o.soft_epochs > 0, "--soft-epochs", "prunes channels")):
        if given:  # e.g. --workers: the weight search's trial loop has no heartbeat or dead-worker recovery
            raise AutopruneError(f"{flag} {why}; leave it out with --granularity weight")
    return search_weights(model, data, budget, o, extra)


def _finish(problem: Problem, the_study: optuna.Study, chosen: optuna.trial.FrozenTrial, settings: Settings,
            quiet: bool, started: float, budget: Budget | BudgetRange, limits: Cost, run: Prepared,
            extra: dict[str, Any], time_budget: float | None = None) -> Result:
    """Export the chosen trial (once), write the trials table and the summary, and hand back the result."""
    data, out = run.data, run.out
    plan = exported_plan(chosen, absolute_spec(run.name), data, run.study)
    write_text(out / "trials.csv", trials_table(the_study).to_csv(index=False))
    start = warm_start(problem.checkpoints, chosen.number, extra)
    record = dict(budget=str(budget), budget_flops=limits.flops, budget_params=limits.params,
                  trial=chosen.number, trial_val_accuracy=chosen.value, trials=ended(the_study),
                  pruned_trials=count_pruned(the_study),
                  final_epochs=round(settings.final_epochs, 3), model=run.name, base_model=run.base_id,
                  dataset=data.name, study=run.study, storage=run.storage, device=str(run.device),
                  input_shape=list(data.input_shape),
                  warm_start=start and str(start.relative_to(out)), **extra,
                  **_latency_record(chosen, limits, problem.meter))
    if time_budget:  # a rerun keeps the export it planned, not one planned anew
        record["time_budget_seconds"] = time_budget
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
    return Result(pruned, plan, summary, the_study, out)


def _latency_record(chosen: optuna.trial.FrozenTrial, limits: Cost, meter: Meter | None) -> dict[str, Any]:
    """The chosen trial's latency for the summary, under ``latency``: as measured in the search
    (``ms``, ``spread_ms``, ``share``, ``predicted_ms``), the base's, the cap and the settings."""
    found = {k.removeprefix("latency_"): chosen.user_attrs[k] for k in LATENCY_ATTRS if k in chosen.user_attrs}
    if meter is not None:
        found.update(base_ms=meter.base_ms, base_spread_ms=meter.base_spread_ms, **meter.settings.config())
    if math.isfinite(limits.latency):
        found["budget_ms"] = limits.latency
    return {"latency": found} if found else {}


def _spawn(model: nn.Module | str, data: Data, budget: Any, options: SearchOptions, index: int,
           workers: int) -> multiprocessing.Process:
    """Start worker process ``index`` of ``workers``: :func:`search` with ``options`` as worker ``index``."""
    call = (model, data, budget, options, index)
    process = multiprocessing.get_context("spawn").Process(
        target=_worker_main, args=(call, os.getpid(), max(1, torch.get_num_threads() // workers)),
        name=f"autoprune-worker-{index}")
    process.start()
    return process


def _worker_main(call: tuple, parent: int, threads: int) -> None:
    """Body of a spawned worker: run trials; die with the parent rather than outlive it."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)  # the parent was killed: its next run fails and retries this worker's trial

    threading.Thread(target=watch, daemon=True).start()
    torch.set_num_threads(threads)
    try:
        model, data, budget, options, index = call
        search(model, data, budget, options, _worker=index)
    except KeyboardInterrupt:  # Ctrl-C reaches every process; the parent says what to do
        raise SystemExit(130) from None
    except AutopruneError as err:
        print(f"autoprune: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _join(children: list[multiprocessing.Process], check: bool = True) -> None:
    for child in children:
        child.join()
    failed = [c.name for c in children if c.exitcode]
    if failed and check:
        raise AutopruneError(f"{', '.join(failed)} stopped with an error (see above); "
                             "run the same command again to resume")


@contextmanager
def _threads(workers: int) -> Iterator[None]:
    """Share the CPU cores among the worker processes while they run."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def extra_settings(o: SearchOptions) -> dict[str, Any]:
    """The optional fine-tune modes, as stored with the study (absent when off, so older studies resume)."""
    extra: dict[str, Any] = {}
    if o.distill:
        Distill(nn.Identity(), o.distill_weight, o.temperature)  # validates the numbers before any work
        extra["distill"] = {"weight": float(o.distill_weight), "temperature": float(o.temperature)}
    if o.soft_epochs:
        extra["soft_epochs"] = float(o.soft_epochs)
    return extra


def _budget_limits(groups: ChannelGroups, budget: Budget | BudgetRange, space: SearchSpace,
                   meter: Meter | None = None) -> tuple[CostModel, Cost]:
    """The cost predictor and the budget's absolute caps (a range's upper end); refuses a budget out of
    reach (a range whose lower end is).

    Under a latency cap, with ``meter``, the predictor predicts latency too (its table
    measured here once per machine and setting); without one (before the base is trained)
    only the other caps are checked, and the latency cap once there is a base to time.
    """
    if not len(groups):
        raise AutopruneError("the model has no prunable channel group; nothing to search")
    space.check_groups(groups.ids)
    costs = CostModel(groups)
    if budget.latency is not None and meter is not None:
        costs = latency_costs(groups, costs, meter, space.round_to)
    limits = budget.limits(costs.base)
    tightest = budget.low.limits(costs.base) if isinstance(budget, BudgetRange) else limits
    if meter is None and budget.latency is not None:  # no base timed yet: its latency cap waits for one
        tightest = replace(tightest, latency=math.inf)
    else:
        check_prunes(budget, limits, costs.base)
    check_reachable(costs, tightest, space.ratio_bounds(groups.ids)[1], space.round_to)
    return costs, limits


EXPORT_KEYS = ("study", "trial", "base_model", "final_epochs", "distill", "soft_epochs", "warm_start")


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
