"""Benchmark: autoprune against the usual baselines, at the same budget and final fine-tune.

Every method turns the same base weights into a plan that meets the budget
(as thop counts it), and every plan gets the same final fine-tune and one test
pass. Methods:

``uniform``
    one ratio for every group, bisected onto the budget, L1 importance;
``global``
    one global ranking of every channel by Torch-Pruning's (mean-normalised)
    group importance, thresholded onto the budget;
``seed``
    autoprune's sensitivity allocation (equal accuracy drop) alone, no search;
``random``
    Optuna's random sampler, with the trials, pruner and per-trial fine-tune of autoprune;
``autoprune``
    the default search (TPE from the sensitivity seed, median pruner on the cheap
    score and half-way through each fine-tune; the final fine-tune goes on from
    the winning trial's weights);
``uniform-matched``
    uniform, fine-tuned for as long as the autoprune search took on top of
    the common final fine-tune: was the search worth its compute?
``autoprune-distill`` (on request)
    the default search with knowledge distillation from the base model in
    every fine-tune, its final one included (``--distill``; weight 0.5, T=4).

Results go to ``results/benchmarks/``: ``bench.csv`` (one row per run, written
after each run so a killed benchmark resumes), ``BENCHMARKS.md`` and ``bench.png``.
"""

from __future__ import annotations

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

from .budget import Budget, check_reachable, fit_plan, fits, project
from .costmodel import CostModel
from .counting import count
from .data import Data, load_data
from .errors import AutopruneError
from .files import atomic_path, fingerprint, versions, write_text
from .api import find_groups, train_base
from .groups import ChannelGroups
from .models import build_model, load_weights
from .plan import Plan
from .sensitivity import GRID, bounds, equal_drop, scan
from .space import SearchSpace, resolve
from .export import finetune
from .study import Problem, Settings, checkpoint, count_pruned, run, trial_plan
from .training import evaluate, recalibrate_bn, resolve_device, train

METHODS = ("uniform", "global", "seed", "random", "autoprune", "uniform-matched", "autoprune-distill")
DEFAULT_METHODS = METHODS[:6]  # the distillation row is asked for with --methods
DISTILL = {"distill": {"weight": 0.5, "temperature": 4.0}}
COLUMNS = ["model", "budget", "seed", "method", "test_accuracy", "val_accuracy", "flops", "params",
           "flops_share", "params_share", "trials", "pruned", "search_seconds", "final_epochs", "seconds", "note"]


@dataclass
class BenchConfig:
    """What to benchmark; the defaults are the published benchmark."""

    models: Sequence[str] = ("resnet18", "mobilenet_v2", "vgg11_bn")
    budgets: Sequence[float] = (0.25, 0.10, 0.05)
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = DEFAULT_METHODS
    dataset: str = "digits"
    trials: int = 12
    pruner: str = "median"
    train_epochs: float = 15.0
    base_lr: float = 0.01  # one recipe for every model: 0.05 leaves vgg11_bn at chance
    finetune_epochs: float = 1.0
    final_epochs: float = 1.0  # short, as after-pruning recovery is where methods differ
    grid: Sequence[float] = GRID
    max_ratio: float = 0.9
    rank_plans: int = 30
    out: Path = Path("results/benchmarks")
    device: str = "auto"
    quiet: bool = False
    command: str = ""
    extra: dict = field(default_factory=dict)


QUICK = dict(models=("resnet18",), budgets=(0.25,), seeds=(0,), trials=3, train_epochs=2.0, base_lr=0.05,
             finetune_epochs=0.2, final_epochs=0.5, grid=(0.3, 0.6), rank_plans=4)


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


def _subject(name: str, data: Data, config: BenchConfig, device: torch.device) -> Subject:
    """Train (or reload) the base model and scan its sensitivity, cached under ``out/cache``."""
    cache = config.out / "cache" / Path(name).stem
    model = build_model(name, data.num_classes)
    weights = cache / "base.pt"
    if weights.is_file():
        load_weights(model, weights)
    else:
        train_base(model, data, config.train_epochs, device, 64, 0, cache, config.quiet, lr=config.base_lr)
    model = model.to(device).eval()
    space = resolve(None, name).replace(grid=tuple(config.grid), max_ratio=config.max_ratio)
    groups = find_groups(model, data.example_input(), space, data, 64, 0,
                         base_model=fingerprint(model.state_dict()), device=device)
    costs = CostModel(groups)
    base_val = evaluate(model, data.loader("val", 256), device)
    table = scan(groups, costs, model, data, base_val, device, cache / "sensitivity.csv", space.grid,
                 quiet=config.quiet, round_to=space.round_to)
    return Subject(name, model, data, groups, costs, table, base_val, device, space)


def _problem(subject: Subject, budget: float, config: BenchConfig) -> Problem:
    s = subject
    limits = Budget(flops=budget).limits(s.costs.base)
    round_to = s.space.round_to
    low, ceiling = s.space.ratio_bounds(s.groups.ids)
    check_reachable(s.costs, limits, ceiling, round_to)
    high = np.maximum(low, bounds(s.table, s.costs, limits, ceiling, round_to=round_to))
    return Problem(s.model, s.data, s.groups, s.costs, limits, low, high,
                   equal_drop(s.table, s.costs, limits, low, high, round_to), s.base_val, s.device, round_to)


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
              extra: dict, folder: Path) -> tuple[Plan, Path | None, optuna.Study]:
    """Run a search as ``autoprune search`` does; the plan and the weights its final fine-tune starts from."""
    study = optuna.create_study(direction="maximize")
    settings = Settings(config.trials, config.finetune_epochs, config.final_epochs, seed=seed, extra=extra,
                        pruner=config.pruner)
    run(replace(problem, checkpoints=folder), study, settings, quiet=True, sampler=sampler,
        seed_first=sampler is None)
    start = checkpoint(folder, study.best_trial.number)
    return trial_plan(study.best_trial), start if start.is_file() else None, study


def finish(problem: Problem, plan: Plan, epochs: float, seed: int, start: Path | None = None,
           extra: dict | None = None) -> dict:
    """The final recipe every method gets (:func:`autoprune.export.finetune`), then validation and one test."""
    data, device = problem.data, problem.device
    model, _ = finetune(problem, plan, Settings(final_epochs=epochs, seed=seed, extra=extra or {}), start)
    cost = count(model, problem.groups.example_input)
    base = problem.costs.base
    return {"test_accuracy": evaluate(model, data.loader("test", 256), device),
            "val_accuracy": evaluate(model, data.loader("val", 256), device),
            "flops": cost.flops, "params": cost.params, "flops_share": cost.flops / base.flops,
            "params_share": cost.params / base.params}


def seconds_per_epoch(problem: Problem, plan: Plan, epochs: float = 0.25) -> float:
    """How long one epoch of fine-tuning ``plan``'s model takes here."""
    model = problem.groups.apply(plan)
    start = time.perf_counter()
    train(model, problem.data.loader("train", 64, shuffle=True), epochs, problem.device, quiet=True)
    return (time.perf_counter() - start) / epochs


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)


def _append(path: Path, frame: pd.DataFrame, row: dict) -> pd.DataFrame:
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True) if len(frame) else pd.DataFrame([row])
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _run_one(problem: Problem, method: str, seed: int, config: BenchConfig, searched_seconds: float) -> dict:
    """One (method, seed): its plan, the common final fine-tune, the numbers."""
    start = time.perf_counter()
    trials = stopped = 0
    epochs, note, weights = config.final_epochs, "", None
    extra = DISTILL if method == "autoprune-distill" else {}
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-") as folder:
        if method in ("uniform", "uniform-matched"):
            plan = _uniform(problem, config)
        elif method == "global":
            plan = _global(problem, config)
        elif method == "seed":
            plan = _seed(problem, config)
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed) if method == "random" else None
            plan, weights, study = _searched(problem, config, seed, sampler, extra, Path(folder))
            trials = len(study.trials)
            stopped = count_pruned(study)
        search_seconds = time.perf_counter() - start
        if method == "uniform-matched":  # the autoprune run's wall time, as epochs of this model's fine-tune
            extra_epochs = searched_seconds / seconds_per_epoch(problem, plan)
            epochs = config.final_epochs + extra_epochs
            note = f"{searched_seconds:.0f}s of autoprune search = {extra_epochs:.1f} extra epochs"
        result = finish(problem, plan, epochs, seed, weights, extra)
    return {**result, "trials": trials, "pruned": stopped, "search_seconds": round(search_seconds, 1),
            "final_epochs": round(epochs, 2), "seconds": round(time.perf_counter() - start, 1), "note": note}


def benchmark(config: BenchConfig) -> pd.DataFrame:
    """Run every (model, budget, seed, method) not yet in ``bench.csv``; write the report."""
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise AutopruneError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    device = resolve_device(config.device)
    data = load_data(config.dataset)
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
                            frame = _append(path, frame, {"model": name, "budget": budget, "seed": seed,
                                                          "method": method, "note": str(err)})
                continue
            for seed in config.seeds:
                for method in config.methods:
                    if (name, float(budget), seed, method) in done:
                        continue
                    prior = frame[(frame.model == name) & (frame.budget == budget) & (frame.seed == seed)
                                  & (frame.method == "autoprune")]
                    searched = float(prior["search_seconds"].iloc[0]) if len(prior) else 0.0
                    try:
                        row = _run_one(problem, method, seed, config, searched)
                    except AutopruneError as err:
                        row = {"note": str(err)}
                    row = {"model": name, "budget": budget, "seed": seed, "method": method, **row}
                    frame = _append(path, frame, row)
                    if not config.quiet:
                        print(_line(row))
        _rank_once(subject, config)
    report(frame, config)
    return frame


def _rank_once(subject: Subject, config: BenchConfig) -> None:
    """Add the model's rank check to ``ranking.csv`` unless it is there already."""
    path = config.out / "ranking.csv"
    table = _read_any(path)
    if config.rank_plans <= 0 or (len(table) and subject.name in set(table["model"])):
        return
    budget = 0.10 if 0.10 in config.budgets else config.budgets[0]
    try:
        found = rank_check(_problem(subject, budget, config), config)
    except AutopruneError:
        return
    row = {"model": subject.name, "budget": budget, **found}
    if not config.quiet:
        print(f"{subject.name}: Spearman {found['spearman']:.2f} between cheap score and fine-tuned accuracy "
              f"over {found['plans']} plans")
    _append(path, table, row)


def _read_any(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def rank_check(problem: Problem, config: BenchConfig, seed: int = 0) -> dict:
    """How well the cheap score (pruned, BatchNorm recalibrated) ranks plans by fine-tuned accuracy.

    Samples ``config.rank_plans`` random feasible plans, scores each both ways and
    returns the Spearman correlation, with where a trial's time goes on average.
    """
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    n = len(problem.groups)
    data, device = problem.data, problem.device
    loader, val = data.loader("train", 64, shuffle=True, seed=seed), data.loader("val", 256)
    cheap, tuned, phases = [], [], {k: 0.0 for k in PHASES}
    for _ in range(config.rank_plans):
        clock = time.perf_counter()
        ratios = rng.uniform(0, config.max_ratio, n)
        kept = project(problem.costs, ratios, problem.limits, np.zeros(n), np.full(n, config.max_ratio),
                       problem.round_to)
        plan = problem.groups.plan(dict(zip(problem.costs.ids, kept.astype(int).tolist())))
        clock = _lap(phases, "projection", clock)
        model = problem.groups.apply(plan)
        clock = _lap(phases, "surgery", clock)
        count(model, problem.groups.example_input)
        clock = _lap(phases, "thop check", clock)
        model.to(device)
        recalibrate_bn(model, loader, device, Settings().trial_bn_batches)  # as a trial does
        clock = _lap(phases, "BatchNorm recalibration", clock)
        cheap.append(evaluate(model, val, device))
        clock = _lap(phases, "evaluation", clock)
        train(model, loader, config.finetune_epochs, device, lr=0.01, quiet=True)
        clock = _lap(phases, "fine-tuning", clock)
        tuned.append(evaluate(model, val, device))
        _lap(phases, "evaluation", clock)
    rho = float(spearmanr(cheap, tuned).statistic) if len(set(cheap)) > 1 and len(set(tuned)) > 1 else float("nan")
    return {"spearman": rho, "plans": len(cheap), **{k: v / len(cheap) for k, v in phases.items()}}


PHASES = ("projection", "surgery", "thop check", "BatchNorm recalibration", "fine-tuning", "evaluation")


def _lap(phases: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    phases[name] += now - since
    return now


def _line(row: dict) -> str:
    if not isinstance(row.get("test_accuracy"), float) or math.isnan(row["test_accuracy"]):
        return f"{row['model']} flops={row['budget']} seed {row['seed']} {row['method']}: {row.get('note')}"
    return (f"{row['model']} flops={row['budget']} seed {row['seed']} {row['method']:>15s}: test "
            f"{row['test_accuracy']:.2%} | FLOPs {row['flops_share']:.1%} of base (thop MACs) | "
            f"params {row['params_share']:.1%} | {row['seconds']:.0f}s")


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds per (model, budget, method)."""
    ok = frame.dropna(subset=["test_accuracy"])
    grouped = ok.groupby(["model", "budget", "method"], sort=False)
    table = grouped.agg(test_mean=("test_accuracy", "mean"), test_std=("test_accuracy", "std"),
                        runs=("test_accuracy", "size"), flops_share=("flops_share", "mean"),
                        params_share=("params_share", "mean"), seconds=("seconds", "mean"),
                        trials=("trials", "mean"), pruned=("pruned", "mean")).reset_index()
    order = {method: i for i, method in enumerate(METHODS)}  # rows measured in any order read in one
    table = table.sort_values(["budget", "method"], ascending=[False, True], kind="stable",
                              key=lambda col: col.map(order) if col.name == "method" else col)
    return table.reset_index(drop=True).fillna({"test_std": 0.0})


def report(frame: pd.DataFrame, config: BenchConfig) -> None:
    """Write ``BENCHMARKS.md`` and ``bench.png`` from every row measured so far."""
    table = summarise(frame)
    lines = [
        "# Benchmarks", "",
        f"Made by: `{config.command or 'autoprune bench'}`", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
        f"Data: {config.dataset}. FLOPs are thop MACs, measured on each final model. Every method gets the "
        f"same base weights and the same final fine-tune ({config.final_epochs:g} epochs SGD, lr 0.01, "
        f"cosine) except uniform-matched, which is fine-tuned as long as the autoprune search took. "
        f"Searches (random, autoprune): {config.trials} trials, {config.finetune_epochs:g} fine-tune epoch(s) "
        f"each, pruner {config.pruner} (a trial below the median of those that got as far is dropped after "
        "the cut, before any fine-tuning, or half-way through its fine-tune; 'pruned' is the mean count); "
        "their final fine-tune goes on from the winning trial's weights. "
        "Test accuracy: mean ± standard deviation over seeds; seconds: wall time of the whole method, "
        "search included.", "",
    ]
    for model in dict.fromkeys(table["model"]):
        lines += [f"## {model}", "", "| budget | method | test accuracy | FLOPs share | params share | seconds "
                  "| trials (pruned) | runs |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in table[table["model"] == model].itertuples():
            trials = f"{row.trials:.0f} ({row.pruned:.1f})" if row.trials else ""
            lines.append(f"| {row.budget:g} | {row.method} | {row.test_mean:.2%} ± {row.test_std:.2%} | "
                         f"{row.flops_share:.1%} | {row.params_share:.1%} | {row.seconds:.1f} | {trials} | "
                         f"{row.runs} |")
        scan = _read_any(config.out / "cache" / Path(model).stem / "sensitivity.csv")
        if len(scan):
            lines.append(f"\nThe sensitivity scan ({len(scan)} cells) took {scan['seconds'].sum():.0f} s, once per "
                         "model; seed, random and autoprune share it at every budget, and it is not in their "
                         "seconds above.")
        failed = frame[(frame.model == model) & frame["test_accuracy"].isna()]
        for row in failed.drop_duplicates(["budget", "method"]).itertuples():
            lines.append(f"\n{row.method} at flops={row.budget:g}: {row.note}")
        lines.append("")
    lines += ["![test accuracy against FLOPs](bench.png)", ""]
    ranking = _read_any(config.out / "ranking.csv")
    if len(ranking):
        lines += ["## Does the cheap score rank candidates?", "",
                  f"Spearman correlation between a plan's validation accuracy right after pruning and "
                  f"BatchNorm recalibration (the cheap score) and after {config.finetune_epochs:g} fine-tune "
                  "epoch(s), over random feasible plans; and where such a trial's time goes (seconds).", "",
                  "| model | budget | plans | Spearman | " + " | ".join(PHASES) + " | not training or evaluating |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in PHASES) + " | --- |"]
        for row in ranking.to_dict("records"):
            total = sum(row[p] for p in PHASES)
            overhead = sum(row[p] for p in PHASES if p not in ("fine-tuning", "evaluation")) / total
            lines.append(f"| {row['model']} | {row['budget']:g} | {row['plans']:.0f} | {row['spearman']:.2f} | "
                         + " | ".join(f"{row[p]:.3f}" for p in PHASES) + f" | {overhead:.1%} |")
        lines.append("")
    write_text(config.out / "BENCHMARKS.md", "\n".join(lines))
    _plot(table, config.out / "bench.png")


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in METHODS:
            rows = table[(table["model"] == model) & (table["method"] == method)].sort_values("flops_share")
            if len(rows):
                ax.errorbar(100 * rows["flops_share"], 100 * rows["test_mean"], yerr=100 * rows["test_std"],
                            marker="o", capsize=3, label=method)
        ax.set(title=model, xlabel="FLOPs kept, % of base (thop MACs)", ylabel="test accuracy, %")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
