"""Benchmark: autoprune against the usual baselines, at the same budget and the same wall time.

Every method turns the same base weights into a plan that meets the budget
(as thop counts it) and is tested once. The question a user asks is whether
the search is worth its compute, so the searches run under a time budget
(``time_budget`` seconds for scan, search and final fine-tune together) and
``uniform-matched`` fine-tunes the uniform plan for exactly as long as the
autoprune run took. uniform, global and seed get a fixed short fine-tune and
show where the floor is; ``*-converged`` rows give a plan a long fine-tune
from the cut, where the quality of the allocation alone shows. Methods:

``uniform``
    one ratio for every group, bisected onto the budget, L1 importance;
``global``
    one global ranking of every channel by Torch-Pruning's (mean-normalised)
    group importance, thresholded onto the budget;
``seed``
    autoprune's sensitivity allocation (equal accuracy drop) alone, no search;
``random``
    Optuna's random sampler, everything else as autoprune (no seed or uniform start);
``autoprune``
    ``autoprune search --time-budget``: successive halving from the sensitivity
    seed and the uniform plan, TPE, survivors carrying their weights into the
    final fine-tune (:mod:`autoprune.study.halving`); without a time budget, the
    trial-count search with the median pruner;
``uniform-matched``
    uniform, fine-tuned for as long as the autoprune run took (scan included):
    was the search worth its compute?
``uniform-converged``, ``seed-converged``, ``autoprune-converged``
    that method's plan (same seed) cut from the base and fine-tuned
    ``converged_epochs``: the allocations compared with training equalised.
``autoprune-distill`` (on request)
    the default search with knowledge distillation from the base model in
    every fine-tune, its final one included (``--distill``; weight 0.5, T=4).
``fastnas`` (on request; ``pip install "autoprune[bench-peers]"``)
    NVIDIA ModelOpt's FastNAS, a peer: its search scored on the same images, then
    fine-tuned by the clock for the rest of the time budget (:mod:`autoprune.bench.fastnas`).

Results go to ``results/benchmarks/``: ``bench.csv`` (one row per run, written
after each run so a killed benchmark resumes; it holds each plan, so converged
rows reuse them), ``BENCHMARKS.md`` and ``bench.png``.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
import pandas as pd
import torch
from torch.utils.data import Subset

from autoprune.bench import fastnas
from autoprune.bench.markdown import own_sections
from autoprune.cost.budget import Budget, check_reachable, fit_plan, fits, project
from autoprune.cost.costmodel import CostModel
from autoprune.counting import count
from autoprune.errors import AutopruneError
from autoprune.export.final import finetune
from autoprune.files import append_rows, atomic_path, fingerprint, versions, write_text
from autoprune.inputs.data import Data, load_data
from autoprune.inputs.models import build_model, load_weights
from autoprune.inputs.task import Task, load_task
from autoprune.options import BASE_EPOCHS, BASE_LR, DEFAULTS, FINETUNE_LR
from autoprune.prune.groups import ChannelGroups
from autoprune.prune.plan import Plan
from autoprune.study.halving import (CHECK_EPOCHS, MIN_RUNG_EPOCHS, SCAN_SHARE, Deadline, scoring_seconds,
                                            timed_search)
from autoprune.study.pipeline import bounded_problem, find_groups, train_base
from autoprune.study.sensitivity import GRID, scan
from autoprune.study.space import SearchSpace, resolve
from autoprune.study.trials import COMPLETE, PRUNED, Problem, Settings, checkpoint, count_pruned, run, trial_plan
from autoprune.train.distill import kd_loss
from autoprune.train.loop import evaluate, recalibrate_bn, resolve_device, train

CONVERGED = ("uniform-converged", "seed-converged", "autoprune-converged")
METHODS = ("uniform", "global", "seed", "random", "autoprune", "uniform-matched", "autoprune-distill", *CONVERGED,
           "fastnas")
DEFAULT_METHODS = METHODS[:6]  # distillation, converged and peer rows are asked for with --methods
DISTILL = {"distill": {"weight": 0.5, "temperature": 4.0}}
COLUMNS = ["model", "budget", "seed", "method", "test_accuracy", "val_accuracy", "base_test_accuracy", "flops",
           "params", "flops_share", "params_share", "trials", "pruned", "search_seconds", "final_epochs",
           "seconds", "wall_seconds", "time_budget", "overhead", "plan", "note"]


@dataclass
class BenchConfig:
    """What to benchmark; the defaults are the published benchmark."""

    models: Sequence[str] = ("resnet18", "mobilenet_v2")
    budgets: Sequence[float] = (0.10, 0.05, 0.02)
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = DEFAULT_METHODS
    dataset: str = "fashion-mnist"
    task: str | None = None  # file.py:name of a Task factory (default: classification)
    train_images: int = 20000  # a fixed random subset of the training split (0: all of it)
    time_budget: float = 120.0  # seconds per search run, scan included (0: the trial-count search)
    trials: int = DEFAULTS.trials
    pruner: str = "median"
    train_epochs: float = BASE_EPOCHS  # a base trained to a plateau: an under-trained one leaves no headroom
    base_lr: float = BASE_LR
    finetune_epochs: float = DEFAULTS.finetune_epochs
    final_epochs: float = 1.0  # the floor methods' short fine-tune
    converged_epochs: float = 10.0
    grid: Sequence[float] = GRID
    max_ratio: float = 0.9
    rank_plans: int = 0
    out: Path = Path("results/benchmarks")
    device: str = "auto"
    quiet: bool = False
    command: str = ""
    extra: dict = field(default_factory=dict)


QUICK = dict(models=("resnet18",), budgets=(0.25,), seeds=(0,), trials=3, train_epochs=2.0,
             dataset="digits", train_images=0, time_budget=20.0, finetune_epochs=0.2, final_epochs=0.5,
             converged_epochs=0.5, grid=(0.3, 0.6), rank_plans=4)


def quick(config: BenchConfig) -> BenchConfig:
    """A smoke-test variant: one model, one budget, one seed, a few short trials."""
    return replace(config, **QUICK)


@dataclass
class Subject:
    """One base model, ready to prune: everything that does not depend on the budget."""

    name: str
    model: torch.nn.Module
    data: Data
    groups: ChannelGroups
    costs: CostModel
    table: pd.DataFrame
    base_val: float
    device: torch.device
    space: SearchSpace
    base_test: float = float("nan")
    scan_seconds: float = 0.0  # what the sensitivity scan took: charged to every search run
    eval_seconds: float = 0.0  # scoring one image with the base model


def bench_data(config: BenchConfig) -> Data:
    """The benchmark's data: the data set, its training split cut to ``train_images`` (a fixed subset)."""
    data = load_data(config.dataset, task=load_task(config.task))
    if config.train_images and len(data.train) > config.train_images:
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        data = replace(data, train=Subset(data.train, sorted(order[:config.train_images].tolist())))
    return data


def _subject(name: str, data: Data, config: BenchConfig, device: torch.device) -> Subject:
    """Train (or reload) the base model and scan its sensitivity, cached under ``out/cache``.

    With a time budget the scan gets :data:`autoprune.study.halving.SCAN_SHARE` of it, as
    ``autoprune search --time-budget`` gives it, and its time is charged to every search run.
    """
    cache = config.out / "cache" / data.name / Path(name).stem
    model = build_model(name, data.num_classes, input_shape=data.input_shape)
    weights = cache / "base.pt"
    if weights.is_file():
        load_weights(model, weights)
    else:
        train_base(model, data, config.train_epochs, device, DEFAULTS.batch_size, 0, cache, config.quiet, lr=config.base_lr)
    model = model.to(device).eval()
    space = resolve(None, name).replace(grid=tuple(config.grid), max_ratio=config.max_ratio)
    groups = find_groups(model, data.example_input(), space, data, DEFAULTS.batch_size, 0,
                         base_model=fingerprint(model.state_dict()), device=device)
    costs = CostModel(groups)
    clock = time.perf_counter()
    base_val = evaluate(model, data.loader("val", 256), device, data.task)
    eval_seconds = (time.perf_counter() - clock) / len(data.val)
    base_score = evaluate(model, data.loader("score", 256), device, data.task)
    seconds = None
    if config.time_budget:  # one run's scan share, spent once: a rerun of the benchmark does not extend it
        seconds = max(0.0, SCAN_SHARE * config.time_budget - _read_any(cache / "sensitivity.csv").get(
            "seconds", pd.Series(dtype=float)).sum())
    table = scan(groups, costs, model, data, base_score, device, cache / "sensitivity.csv", space.grid,
                 quiet=config.quiet, round_to=space.round_to, seconds=seconds)
    base_test = evaluate(model, data.loader("test", 256), device, data.task)
    return Subject(name, model, data, groups, costs, table, base_val, device, space, base_test,
                   float(table["seconds"].sum()), eval_seconds)


def _problem(subject: Subject, budget: float, config: BenchConfig) -> Problem:
    s = subject
    limits = Budget(flops=budget).limits(s.costs.base)
    check_reachable(s.costs, limits, s.space.ratio_bounds(s.groups.ids)[1], s.space.round_to)
    return bounded_problem(s.model, s.data, s.groups, s.costs, s.table, s.space, limits, s.base_val, s.device)


def _uniform(problem: Problem, config: BenchConfig) -> Plan:
    n = len(problem.groups)
    plan, _, _ = fit_plan(problem.groups, problem.costs, np.zeros(n), problem.limits, np.zeros(n),
                          np.full(n, config.max_ratio), problem.round_to)
    return plan


def _global(problem: Problem, config: BenchConfig) -> Plan:
    """Keep every channel whose group-normalised importance is above one global threshold."""
    groups, costs = problem.groups, problem.costs
    scores = {gid: groups.scores[gid].numpy() for gid in costs.ids}
    pooled = np.sort(np.concatenate(list(scores.values())))

    unit = {gid: groups[gid].unit for gid in costs.ids}  # scores are per position within a block

    def keep(threshold: float) -> np.ndarray:
        return np.array([unit[g] * max(1, int((scores[g] > threshold).sum())) for g in costs.ids], dtype=float)

    lo, hi = 0, len(pooled) - 1  # indices into the pooled scores: prune everything at or below
    if not fits(costs.predict_vector(keep(pooled[hi])), problem.limits):
        raise AutopruneError("global ranking cannot reach this budget")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(costs.predict_vector(keep(pooled[mid])), problem.limits):
            hi = mid
        else:
            lo = mid
    plan = groups.plan(dict(zip(costs.ids, keep(pooled[hi]).astype(int).tolist())))
    if not fits(count(groups.apply(plan), groups.example_input), problem.limits):
        raise AutopruneError("global ranking overshoots the budget as thop counts it")
    return plan


def _seed(problem: Problem, config: BenchConfig) -> Plan:
    plan, _, _ = fit_plan(problem.groups, problem.costs, problem.seed_ratios, problem.limits, problem.low,
                          problem.high, problem.round_to)
    return plan


def _searched(problem: Problem, config: BenchConfig, seed: int, sampler: optuna.samplers.BaseSampler | None,
              extra: dict, folder: Path, deadline: Deadline | None,
              reserve: float) -> tuple[Plan, Path | None, optuna.Study, float, float]:
    """Run a search as ``autoprune search`` does: the plan, the weights its final fine-tune starts
    from, the study, and the final fine-tune's epochs and seconds (with a ``deadline``: trained by
    the clock until it, less ``reserve``)."""
    study = optuna.create_study(direction="maximize")
    settings = Settings(config.trials, config.finetune_epochs, config.final_epochs, seed=seed, extra=extra,
                        pruner=config.pruner)
    problem = replace(problem, checkpoints=folder)
    if deadline is not None:
        chosen, seconds = timed_search(problem, study, settings, deadline, reserve, quiet=True, sampler=sampler,
                                       seed_first=sampler is None)
        epochs = 0.0
    else:
        run(problem, study, settings, quiet=True, sampler=sampler, seed_first=sampler is None)
        chosen, epochs, seconds = study.best_trial, config.final_epochs, 0.0
    start = checkpoint(folder, chosen.number)
    return trial_plan(chosen), start if start.is_file() else None, study, epochs, seconds


def finish(problem: Problem, plan: Plan, epochs: float, seed: int, start: Path | None = None,
           extra: dict | None = None, seconds: float = 0.0) -> dict:
    """The final recipe every method gets (:func:`autoprune.export.final.finetune`), then validation and one test.

    ``seconds`` (a time budget's rest, or the wall time uniform-matched is given) trains by the clock
    instead of for ``epochs``; ``final_epochs`` is what was trained."""
    data, device = problem.data, problem.device
    clock = time.perf_counter()
    settings = Settings(final_epochs=epochs, final_seconds=seconds, seed=seed, extra=extra or {})
    model, _, epochs = finetune(problem, plan, settings, start)
    tuned = time.perf_counter() - clock
    cost = count(model, problem.groups.example_input)
    base = problem.costs.base
    return {"test_accuracy": evaluate(model, data.loader("test", 256), device, data.task),
            "val_accuracy": evaluate(model, data.loader("val", 256), device, data.task),
            "flops": cost.flops, "params": cost.params, "flops_share": cost.flops / base.flops,
            "params_share": cost.params / base.params, "finetune_seconds": tuned, "final_epochs": epochs}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)


def _plan_of(method: str, problem: Problem, config: BenchConfig) -> Plan:
    """The plan of a method that does not search."""
    if method in ("uniform", "uniform-matched"):
        return _uniform(problem, config)
    if method == "global":
        return _global(problem, config)
    return _seed(problem, config)


def _run_one(subject: Subject, problem: Problem, method: str, seed: int, config: BenchConfig,
             prior: dict[str, dict]) -> dict:
    """One (method, seed): its plan, its fine-tune, the numbers. ``prior``: this seed's rows so far."""
    if method == "fastnas":  # a peer: its own search and fine-tune, the same row (autoprune/bench/fastnas.py)
        return fastnas.fastnas_row(problem, seed, config, scoring_seconds(subject.eval_seconds, problem.data))
    start = time.perf_counter()
    trials = stopped = 0
    epochs, note, weights, charged, overhead = config.final_epochs, "", None, 0.0, float("nan")
    seconds = 0.0  # a fine-tune by the clock: a time budget's rest, or the wall time uniform-matched gets
    extra = DISTILL if method == "autoprune-distill" else {}
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-") as folder:
        if method in CONVERGED:
            source = prior.get(method.removesuffix("-converged"))
            if source is None or not isinstance(source.get("plan"), str):
                raise AutopruneError(f"{method} needs the {method.removesuffix('-converged')} row of this seed first")
            plan, epochs = Plan.from_dict(json.loads(source["plan"])), config.converged_epochs
        elif method in ("random", "autoprune", "autoprune-distill"):
            sampler = optuna.samplers.RandomSampler(seed=seed) if method == "random" else None
            charged = subject.scan_seconds if config.time_budget else 0.0
            deadline = Deadline(config.time_budget - charged) if config.time_budget else None
            reserve = scoring_seconds(subject.eval_seconds, problem.data)
            plan, weights, study, epochs, seconds = _searched(problem, config, seed, sampler, extra, Path(folder),
                                                              deadline, reserve)
            trials = len(study.get_trials(deepcopy=False, states=(COMPLETE, PRUNED)))
            stopped = count_pruned(study)
            overhead = _overhead(study)
        else:
            plan = _plan_of(method, problem, config)
        search_seconds = time.perf_counter() - start
        if method == "uniform-matched":  # the autoprune run's wall time, trained by the clock
            searched = prior.get("autoprune", {}).get("wall_seconds")
            if searched is None or searched != searched:
                raise AutopruneError("uniform-matched needs the autoprune row of this seed first")
            seconds = max(searched - search_seconds, 1e-3)
            note = f"{searched:.0f}s of autoprune"
        result = finish(problem, plan, epochs, seed, weights, extra, seconds)
    wall, trained = charged + search_seconds + result.pop("finetune_seconds"), result.pop("final_epochs")
    return {**result, "trials": trials, "pruned": stopped, "search_seconds": round(search_seconds, 1),
            "final_epochs": round(trained, 2), "seconds": round(time.perf_counter() - start, 1),
            "wall_seconds": round(wall, 1), "time_budget": config.time_budget if trials else float("nan"),
            "overhead": overhead, "plan": json.dumps(plan.to_dict()), "note": note}


def _overhead(study: optuna.Study) -> float:
    """The share of the search's work spent cutting candidates (projection, surgery, thop check).

    Counted from each trial's own phases: in successive halving a trial's wall
    time also holds the other candidates' rungs.
    """
    attrs = [t.user_attrs for t in study.trials if "cut_seconds" in t.user_attrs]
    cut = sum(a["cut_seconds"] for a in attrs)
    total = cut + sum(a.get("train_seconds", 0.0) + a.get("score_seconds", 0.0) for a in attrs)
    return cut / total if total else float("nan")


def benchmark(config: BenchConfig) -> pd.DataFrame:
    """Run every (model, budget, seed, method) not yet in ``bench.csv``; write the report."""
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise AutopruneError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    if "fastnas" in config.methods:
        fastnas.require()  # one line, before any work, without nvidia-modelopt
    device = resolve_device(config.device)
    data = bench_data(config)
    path = config.out / "bench.csv"
    frame = _read(path).dropna(subset=["test_accuracy"])  # runs that failed are tried again
    done = {(r.model, float(r.budget), int(r.seed), r.method) for r in frame.itertuples()}
    for name in config.models:
        subject = _subject(name, data, config, device)
        for budget in config.budgets:
            try:
                problem = _problem(subject, budget, config)
            except AutopruneError as err:
                for seed in config.seeds:
                    for method in config.methods:
                        if (name, float(budget), seed, method) not in done:
                            frame = append_rows(path, frame, [{"model": name, "budget": budget, "seed": seed,
                                                               "method": method, "note": str(err)}])
                continue
            for seed in config.seeds:
                for method in config.methods:
                    if (name, float(budget), seed, method) in done:
                        continue
                    mine = frame[(frame.model == name) & (frame.budget == budget) & (frame.seed == seed)]
                    prior = {r["method"]: r for r in mine.to_dict("records")}
                    try:
                        row = _run_one(subject, problem, method, seed, config, prior)
                    except AutopruneError as err:
                        row = {"note": str(err)}
                    row = {"model": name, "budget": budget, "seed": seed, "method": method,
                           "base_test_accuracy": subject.base_test, **row}
                    frame = append_rows(path, frame, [row])
                    if not config.quiet:
                        print(_line(row, subject.data.task))
        _rank_once(subject, config)
    report(frame, config)
    return frame


def _rank_once(subject: Subject, config: BenchConfig) -> None:
    """Measure the candidate proxies on ``config.rank_plans`` plans at the tightest budget, into
    ``proxies.csv`` (one row per plan, written as it is measured, so a killed run goes on)."""
    if config.rank_plans <= 0:
        return
    path = config.out / "proxies.csv"
    table = _read_any(path)
    budget = min(config.budgets)
    mine = table[(table["model"] == subject.name) & (table["budget"] == budget)] if len(table) else table
    try:
        problem = _problem(subject, budget, config)
    except AutopruneError:
        return
    for index in range(len(mine), config.rank_plans):
        row = {"model": subject.name, "budget": budget, "plan_index": index,
               "base_test_accuracy": subject.base_test, **measure_proxies(problem, config, index)}
        table = append_rows(path, table, [row])
        if not config.quiet:
            print(f"{subject.name} flops={budget:g} plan {index + 1}/{config.rank_plans}: "
                  + ", ".join(f"{k} {row[k]:.4f}" for k in PROXIES + ("converged",)))


PROXIES = ("bn_score", "kd_loss", f"score_{CHECK_EPOCHS:g}ep", f"score_{MIN_RUNG_EPOCHS:g}ep")
PHASES = ("projection", "surgery", "thop check", "BatchNorm recalibration", "fine-tuning", "evaluation")


def random_plan(problem: Problem, max_ratio: float, seed: int) -> Plan:
    """A random feasible plan: uniform random ratios per group, projected onto the budget."""
    n = len(problem.groups)
    ratios = np.random.default_rng(seed).uniform(0, max_ratio, n)
    kept = project(problem.costs, ratios, problem.limits, np.zeros(n), np.full(n, max_ratio), problem.round_to)
    return problem.groups.plan(dict(zip(problem.costs.ids, kept.astype(int).tolist())))


def measure_proxies(problem: Problem, config: BenchConfig, index: int) -> dict:
    """One random plan's cheap scores against its accuracy after ``config.converged_epochs``.

    The proxies, each measured as a trial would on the score split: accuracy right
    after the cut and BatchNorm recalibration (``bn_score``); the distillation
    loss against the base model there (``kd_loss``, lower is better); and the
    accuracy after a rung of :data:`~autoprune.study.halving.CHECK_EPOCHS` and of
    :data:`~autoprune.study.halving.MIN_RUNG_EPOCHS` epochs, each its own fine-tune
    from the cut. ``converged``: test accuracy after the long fine-tune every
    bench method gets (:func:`finish`). Also where a trial's time goes (seconds).
    """
    data, device, settings = problem.data, problem.device, Settings(seed=index)
    loader = data.loader("train", settings.batch_size, shuffle=True, seed=index)
    scoring = data.loader("score", 256)
    phases = {k: 0.0 for k in PHASES}
    clock = time.perf_counter()
    plan = random_plan(problem, config.max_ratio, 1000 + index)
    clock = _lap(phases, "projection", clock)

    def cut() -> torch.nn.Module:
        nonlocal clock
        model = problem.groups.apply(plan)
        clock = _lap(phases, "surgery", clock)
        count(model, problem.groups.example_input)
        clock = _lap(phases, "thop check", clock)
        recalibrate_bn(model.to(device), loader, device, settings.trial_bn_batches, task=data.task)
        clock = _lap(phases, "BatchNorm recalibration", clock)
        return model

    model = cut()
    row = {"bn_score": evaluate(model, scoring, device, data.task), "kd_loss": distill_loss(model, problem.model, scoring,
                                                                                 device)}
    clock = _lap(phases, "evaluation", clock)
    for epochs in (CHECK_EPOCHS, MIN_RUNG_EPOCHS):
        model = cut()
        torch.manual_seed(index)
        train(model, loader, epochs, device, lr=settings.lr, quiet=True, task=data.task)
        clock = _lap(phases, "fine-tuning", clock)
        row[f"score_{epochs:g}ep"] = evaluate(model, scoring, device, data.task)
        clock = _lap(phases, "evaluation", clock)
    final = finish(problem, plan, config.converged_epochs, index)
    cost = count(problem.groups.apply(plan), problem.groups.example_input)
    return {**row, "converged": final["test_accuracy"], "converged_epochs": config.converged_epochs,
            "flops_share": cost.flops / problem.costs.base.flops, "plan": json.dumps(plan.to_dict()),
            **{f"seconds_{k}": v / 3 for k, v in phases.items()}}  # per trial: three cuts were timed


@torch.no_grad()
def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, loader, device: torch.device) -> float:
    """Mean temperature-softened KL from the teacher's outputs to the student's (as :func:`kd_loss` weighs it)."""
    student.eval(), teacher.eval()
    total, seen = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        total += float(kd_loss(student(images), teacher(images), labels, weight=1.0)) * len(labels)
        seen += len(labels)
    return total / seen


def proxy_table(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of each proxy with the converged accuracy, per (model, budget)."""
    from scipy.stats import spearmanr

    rows = []
    for (model, budget), part in table.groupby(["model", "budget"], sort=False):
        row = {"model": model, "budget": budget, "plans": len(part), "epochs": part["converged_epochs"].iloc[0],
               "spread": part["converged"].max() - part["converged"].min(), "std": part["converged"].std()}
        for proxy in PROXIES:
            sign = -1 if proxy == "kd_loss" else 1  # a lower loss should mean a better plan
            row[proxy] = float(spearmanr(sign * part[proxy], part["converged"]).statistic)
        rows.append(row)
    return pd.DataFrame(rows)


def _read_any(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def _lap(phases: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    phases[name] += now - since
    return now


def _line(row: dict, task: Task) -> str:
    if not isinstance(row.get("test_accuracy"), float) or math.isnan(row["test_accuracy"]):
        return f"{row['model']} flops={row['budget']} seed {row['seed']} {row['method']}: {row.get('note')}"
    return (f"{row['model']} flops={row['budget']} seed {row['seed']} {row['method']:>15s}: test {task.name} "
            f"{task.show(row['test_accuracy'])} | FLOPs {row['flops_share']:.1%} of base (thop MACs) | "
            f"params {row['params_share']:.1%} | {row['seconds']:.0f}s")


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds per (model, budget, method)."""
    ok = frame.dropna(subset=["test_accuracy"])
    grouped = ok.groupby(["model", "budget", "method"], sort=False)
    table = grouped.agg(test_mean=("test_accuracy", "mean"), test_std=("test_accuracy", "std"),
                        runs=("test_accuracy", "size"), flops_share=("flops_share", "mean"),
                        params_share=("params_share", "mean"), seconds=("seconds", "mean"),
                        wall=("wall_seconds", "mean"), epochs=("final_epochs", "mean"),
                        base=("base_test_accuracy", "mean"), overhead=("overhead", "mean"),
                        trials=("trials", "mean"), pruned=("pruned", "mean")).reset_index()
    order = {method: i for i, method in enumerate(METHODS)}  # rows measured in any order read in one
    table = table.sort_values(["budget", "method"], ascending=[False, True], kind="stable",
                              key=lambda col: col.map(order) if col.name == "method" else col)
    return table.reset_index(drop=True).fillna({"test_std": 0.0})


def report(frame: pd.DataFrame, config: BenchConfig) -> None:
    """Write ``BENCHMARKS.md`` and ``bench.png`` from every row measured so far."""
    table = summarise(frame)
    task = load_task(config.task)
    lines = [
        "# Benchmarks", "",
        f"Made by: `{config.command or 'autoprune bench'}`", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
        _protocol(config), "",
    ]
    for model in dict.fromkeys(table["model"]):
        base = table.loc[table["model"] == model, "base"].dropna()
        lines += [f"## {model}", "", f"Base model: test {task.name} {task.show(base.iloc[0])}." if len(base) else "",
                  "", f"| budget | method | test {task.name} | vs base | FLOPs share | params share | wall s "
                  "| fine-tune epochs | trials (dropped) | trial overhead | runs |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in table[table["model"] == model].itertuples():
            trials = f"{row.trials:.0f} ({row.pruned:.1f})" if row.trials else ""
            overhead = f"{row.overhead:.1%}" if row.overhead == row.overhead else ""
            gap = f"{100 * (row.test_mean - row.base):+.2f}" if row.base == row.base else ""
            lines.append(f"| {row.budget:g} | {row.method} | {task.show(row.test_mean)} ± {task.show(row.test_std)} | {gap} | "
                         f"{row.flops_share:.1%} | {row.params_share:.1%} | {row.wall:.0f} | {row.epochs:.1f} | "
                         f"{trials} | {overhead} | {row.runs} |")
        scan = _read_any(config.out / "cache" / config.dataset / Path(model).stem / "sensitivity.csv")
        if len(scan):
            charged = "and is charged to every search run's wall time" if config.time_budget else \
                "and is not in the searches' seconds"
            lines.append(f"\nThe sensitivity scan ({len(scan)} cells) took {scan['seconds'].sum():.0f} s, once per "
                         f"model; seed, random and autoprune share it at every budget, {charged}.")
        failed = frame[(frame.model == model) & frame["test_accuracy"].isna()]
        for row in failed.drop_duplicates(["budget", "method"]).itertuples():
            lines.append(f"\n{row.method} at flops={row.budget:g}: {row.note}")
        lines.append("")
    lines += [f"![test {task.name} against FLOPs](bench.png)", ""]
    proxies = _read_any(config.out / "proxies.csv")
    if len(proxies):
        lines += _proxy_lines(proxies)
    lines += own_sections(config.out / "BENCHMARKS.md")  # autoprune bench-latency's, with their commands
    write_text(config.out / "BENCHMARKS.md", "\n".join(lines))
    _plot(table, config.out / "bench.png", task)


def _proxy_lines(proxies: pd.DataFrame) -> list[str]:
    """The proxy table: which cheap score ranks plans by their converged accuracy, and what a trial's time is."""
    names = {"bn_score": "after BatchNorm recalibration", "kd_loss": "distillation loss vs base",
             f"score_{CHECK_EPOCHS:g}ep": f"after {CHECK_EPOCHS:g} epoch", f"score_{MIN_RUNG_EPOCHS:g}ep":
             f"after {MIN_RUNG_EPOCHS:g} epoch"}
    lines = ["## Which cheap score ranks candidates?", "",
             "Spearman correlation of each proxy, measured on the score split as a trial does, with the plan's "
             "test accuracy after the long fine-tune ('converged', each its own cut of the base), over random "
             "feasible plans at the model's tightest budget (random ratios per group projected onto it). "
             "'spread': best minus worst converged accuracy of those plans, 'std' their standard deviation; "
             "a proxy can only rank what is wider than the seed-to-seed spread.", "",
             "| model | budget | plans | converged epochs | spread | std | " + " | ".join(names.values()) + " |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for row in proxy_table(proxies).to_dict("records"):
        lines.append(f"| {row['model']} | {row['budget']:g} | {row['plans']} | {row['epochs']:g} | "
                     f"{100 * row['spread']:.2f} | {100 * row['std']:.2f} | "
                     + " | ".join(f"{row[p]:.2f}" for p in names) + " |")
    seconds = proxies[[f"seconds_{p}" for p in PHASES]].mean()
    cut = sum(seconds[f"seconds_{p}"] for p in PHASES[:3])
    lines += ["", "Where a trial's time goes, seconds per cut (mean over those plans): "
              + ", ".join(f"{p} {seconds[f'seconds_{p}']:.3f}" for p in PHASES)
              + f"; cutting (projection, surgery, thop check) is {cut / seconds.sum():.1%} of it.", ""]
    return lines


def _protocol(config: BenchConfig) -> str:
    """How the rows were made, in words, for the top of ``BENCHMARKS.md``."""
    train = f"a fixed random {config.train_images:,} of its training images" if config.train_images else "all of it"
    text = (f"Data: {config.dataset}, {train}; searches score candidates on a fixed random 1,000 of the "
            f"validation images, every row is tested once on the whole test split. Base models: trained "
            f"{config.train_epochs:g} epochs, SGD (Nesterov, cosine) at lr {config.base_lr:g}, batch 64. FLOPs "
            "are thop MACs, measured on each final model. ")
    if config.time_budget:
        text += (f"**Equal wall time.** random and autoprune run under a {config.time_budget:g} s time budget each, "
                 "the sensitivity scan's time included (`autoprune search --time-budget`: successive halving "
                 "whose survivors carry their weights into a final fine-tune that fills the rest; where no "
                 "3-candidate rung of at least half an epoch fits, two candidates, the seed and uniform for "
                 "autoprune and two random plans for random, train a tenth of an epoch and the better one gets "
                 "the whole fine-tune). "
                 "uniform-matched fine-tunes the uniform plan for as long as that seed's autoprune run took "
                 "('wall s'). 'trial overhead': the share of the search's work spent cutting candidates "
                 "(projection, surgery, thop check) rather than training or scoring them. ")
    else:
        text += (f"Searches (random, autoprune): {config.trials} trials, {config.finetune_epochs:g} fine-tune "
                 f"epoch(s) each, pruner {config.pruner}; uniform-matched is fine-tuned as long as autoprune took. ")
    return text + (f"uniform, global and seed get a fixed {config.final_epochs:g}-epoch fine-tune (the floor); "
                   f"*-converged rows cut that method's plan from the base again and fine-tune it "
                   f"{config.converged_epochs:g} epochs. Every fine-tune: SGD lr {FINETUNE_LR:g}, cosine over its steps, or over its "
                   "time where it is given a wall time (a search's final fine-tune, uniform-matched). Test accuracy: mean "
                   "± standard deviation over seeds; 'vs base': points against the unpruned model.")


def _plot(table: pd.DataFrame, path: Path, task: Task) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    if not models:
        return
    scale, unit = (100, ", %") if "%" in task.format else (1, "")  # a score shown as a percentage is plotted as one
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for colour, method in enumerate(METHODS):  # one colour per method in every panel
            rows = table[(table["model"] == model) & (table["method"] == method)].sort_values("flops_share")
            if len(rows):
                ax.errorbar(100 * rows["flops_share"], scale * rows["test_mean"], yerr=scale * rows["test_std"],
                            marker="o", capsize=3, label=method, color=f"C{colour % 10}")
        ax.set(title=model, xlabel="FLOPs kept, % of base (thop MACs)", ylabel=f"test {task.name}{unit}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted(set(100 * table.loc[table["model"] == model, "flops_share"].round(3))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
