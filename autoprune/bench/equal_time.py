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
    ``autoprune search --time-budget --no-distill``: successive halving from the sensitivity
    seed and the uniform plan, TPE, survivors carrying their weights into the
    final fine-tune (:mod:`autoprune.study.halving`), under 10 minutes; from 10
    minutes on, its default: the seed checked against uniform, then trained on
    (:func:`~autoprune.study.halving.races`); without a time budget, the
    trial-count search with the median pruner;
``uniform-matched``
    uniform, fine-tuned for as long as the autoprune run took (scan included):
    was the search worth its compute? Under a time budget, where that seed has
    no autoprune row (only today's default, ``autoprune-distill``, was run), it
    is given the time budget itself: a search stops a second or two before it.
``uniform-converged``, ``seed-converged``, ``autoprune-converged``
    that method's plan (same seed) cut from the base and fine-tuned
    ``converged_epochs``: the allocations compared with training equalised.
``autoprune-distill`` (on request)
    the search with knowledge distillation from the base model's cached
    outputs in every fine-tune, its final one included (weight 0.5, T=4):
    ``autoprune search --time-budget`` as it runs on a classifier by default
    (``autoprune`` keeps its name from before distillation was the default);
``uniform-matched-distill`` (on request)
    uniform-matched with the same distillation, fine-tuned as long as that
    seed's ``autoprune-distill`` run took: is the gain the search's or
    distillation's?
``fastnas`` (on request; ``pip install "autoprune[bench-peers]"``)
    NVIDIA ModelOpt's FastNAS, a peer: its search scored on the same images, then
    fine-tuned by the clock for the rest of the time budget (:mod:`autoprune.bench.fastnas`).
``seed-matched`` (the anytime curve's; on request otherwise)
    the sensitivity seed plan (``seed``'s) with no race: the scan's time is
    charged as in a search run, the plan is fitted, and the fine-tune trains
    by the clock for every second of the time budget left, less the scoring
    reserve a search keeps (:func:`autoprune.study.halving.scoring_seconds`).
    Against ``autoprune`` at the same time budget it shows what the race and
    the sampler add.
``autoprune-race`` (the anytime curve's; on request otherwise)
    ``autoprune search --time-budget --race``: the race at every time budget.
    Under 10 minutes it is ``autoprune`` itself, so the curve runs it from 10
    minutes on only.

**The anytime curve.** ``time_budgets`` (``--time-budgets 2m,10m,30m``) runs
each method at each wall time, :data:`autoprune.bench.anytime.ANYTIME_METHODS`
by default (``random`` at the longest only, unless ``random_every_time``).
The scan is measured once per model with the longest budget's share; a run of
a shorter budget sees only the cells a scan given its share would have
measured (:func:`at_time`) and is charged their seconds. Every row carries its
``time_budget`` and resuming keys on it (rows written before floor rows carried
one count as made at ``time_budget``). The report adds a table and
``anytime.png``: accuracy against wall time per (model, budget).

**Which cheap score ranks?** ``rank_plans`` measures proxies on random plans
(``proxies.csv``, :func:`measure_proxies`); ``proxy_sweep``
(``--proxy-sweep``) re-cuts those plans from the same base weights and adds
the BatchNorm-recalibrated score at 2, 8, 32 and 100 recalibration batches,
each on the score split (1,000 validation images) and on all validation
images (columns ``bn_score_b8_s1000``, ``bn_score_b8_sall``, ...), with no
fine-tune. :func:`proxy_table` gives Spearman's rho and its p-value per
proxy against the converged accuracy. The rule: a proxy **ranks** where
rho >= 0.5 and p < 0.05 (:data:`RANKS_RHO`, :data:`RANKS_P`); only then may a
search screen candidates with it before any fine-tune
(:func:`proxy_that_ranks` names it; nothing screens yet).

Results go to ``results/benchmarks/``: ``bench.csv`` (one row per run, written
after each run so a killed benchmark resumes; it holds each plan, so converged
rows reuse them), ``BENCHMARKS.md``, ``bench.png`` (the rows of ``time_budget``),
``anytime.png`` (with several time budgets) and ``proxies.csv``.
"""

from __future__ import annotations

import itertools
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
from autoprune.bench.anytime import anytime_lines, anytime_table, plot_anytime
from autoprune.bench.markdown import own_sections
from autoprune.cost.budget import Budget, NoFit, check_reachable, fit_plan, fits, project
from autoprune.cost.costmodel import CostModel
from autoprune.counting import count
from autoprune.errors import AutopruneError
from autoprune.export.final import finetune
from autoprune.files import append_rows, atomic_path, fingerprint, versions, write_text
from autoprune.inputs.data import SCORE_IMAGES, Data, load_data
from autoprune.inputs.models import build_model, load_weights
from autoprune.inputs.task import Task, load_task
from autoprune.options import BASE_EPOCHS, BASE_LR, DEFAULTS, FINETUNE_LR
from autoprune.prune.groups import ChannelGroups
from autoprune.prune.plan import Plan
from autoprune.study.halving import (CHECK_EPOCHS, MIN_RUNG_EPOCHS, SCAN_SHARE, Deadline, races, scoring_seconds,
                                     timed_search)
from autoprune.study.pipeline import bounded_problem, find_groups, train_base
from autoprune.study.sensitivity import GRID, coarse_to_fine, scan
from autoprune.study.space import SearchSpace, resolve
from autoprune.study.trials import COMPLETE, PRUNED, Problem, Settings, checkpoint, count_pruned, run, trial_plan
from autoprune.train.distill import kd_loss
from autoprune.train.loop import evaluate, recalibrate_bn, resolve_device, train
from autoprune.train.teacher import TEACHER_OUTPUTS, teacher_outputs

CONVERGED = ("uniform-converged", "seed-converged", "autoprune-converged")
METHODS = ("uniform", "global", "seed", "random", "autoprune", "uniform-matched", "autoprune-distill", *CONVERGED,
           "fastnas")
DEFAULT_METHODS = METHODS[:6]  # distillation, converged and peer rows are asked for with --methods
METHODS += ("seed-matched", "autoprune-race", "uniform-matched-distill")  # the anytime curve's (ANYTIME_METHODS)
DISTILLED = ("autoprune-distill", "uniform-matched-distill")  # fine-tuned against the base's cached outputs
RACING = ("random", "autoprune-race")  # searches that race at any time budget (autoprune: under RACE_BELOW)
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
    time_budgets: Sequence[float] = ()  # the anytime curve: each method at each (empty: time_budget alone)
    random_every_time: bool = False  # with time_budgets: random at each one, not only the longest
    proxy_sweep: bool = False  # only re-measure proxies.csv's plans (BatchNorm recalibration sweep)
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
              extra: dict, folder: Path, deadline: Deadline | None, reserve: float,
              race: bool | None = None) -> tuple[Plan, Path | None, optuna.Study, float, float]:
    """Run a search as ``autoprune search`` does: the plan, the weights its final fine-tune starts
    from, the study, and the final fine-tune's epochs and seconds (with a ``deadline``: trained by
    the clock until it, less ``reserve``; ``race`` as ``--race``/``--no-race``, None: the default)."""
    study = optuna.create_study(direction="maximize")
    settings = Settings(config.trials, config.finetune_epochs, config.final_epochs, seed=seed, extra=extra,
                        pruner=config.pruner, race=races(config.time_budget, race))
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
    return _with_columns(pd.read_csv(path) if path.is_file() else pd.DataFrame())


def _with_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every column of :data:`COLUMNS` (rows that all failed carry only a note), those it
    has in their order: a resumed file is rewritten as it was."""
    return frame.reindex(columns=list(dict.fromkeys([*frame.columns, *COLUMNS])))


def _plan_of(method: str, problem: Problem, config: BenchConfig) -> Plan:
    """The plan of a method that does not search."""
    if method in ("uniform", "uniform-matched", "uniform-matched-distill"):
        return _uniform(problem, config)
    if method == "global":
        return _global(problem, config)
    return _seed(problem, config)


def _measure_method(subject: Subject, problem: Problem, method: str, seed: int, config: BenchConfig,
                    prior: dict[str, dict]) -> dict:
    """One (method, seed): its plan, its fine-tune, the numbers. ``prior``: this seed's rows so far."""
    if method == "fastnas":  # a peer: its own search and fine-tune, the same row (autoprune/bench/fastnas.py)
        return fastnas.fastnas_row(problem, seed, config, scoring_seconds(subject.eval_seconds, problem.data))
    if method == "seed-matched":
        return seed_matched(subject, problem, config, seed)
    kd = teacher_outputs(subject.model, subject.data, config.out / "cache" / subject.data.name / Path(subject.name).stem
                         / TEACHER_OUTPUTS, subject.device, quiet=config.quiet) if method in DISTILLED else None
    problem = replace(problem, teacher_outputs=kd)  # the base's outputs, computed once per base, charged as the scan
    start = time.perf_counter()
    trials = stopped = 0
    epochs, note, weights, charged, overhead = config.final_epochs, "", None, 0.0, float("nan")
    seconds = 0.0  # a fine-tune by the clock: a time budget's rest, or the wall time uniform-matched gets
    extra = DISTILL if method in DISTILLED else {}
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-") as folder:
        if method in CONVERGED:
            source = prior.get(method.removesuffix("-converged"))
            if source is None or not isinstance(source.get("plan"), str):
                raise AutopruneError(f"{method} needs the {method.removesuffix('-converged')} row of this seed first")
            plan, epochs = Plan.from_dict(json.loads(source["plan"])), config.converged_epochs
        elif method in ("random", "autoprune", "autoprune-distill", "autoprune-race"):
            sampler = optuna.samplers.RandomSampler(seed=seed) if method == "random" else None
            charged = subject.scan_seconds + (kd.seconds if kd else 0.0) if config.time_budget else 0.0
            deadline = Deadline(config.time_budget - charged) if config.time_budget else None
            reserve = scoring_seconds(subject.eval_seconds, problem.data)
            plan, weights, study, epochs, seconds = _searched(problem, config, seed, sampler, extra, Path(folder),
                                                              deadline, reserve, True if method in RACING else None)
            trials = len(study.get_trials(deepcopy=False, states=(COMPLETE, PRUNED)))
            stopped = count_pruned(study)
            overhead = _overhead(study)
        else:
            plan = _plan_of(method, problem, config)
        search_seconds = time.perf_counter() - start
        if method.startswith("uniform-matched"):  # the matching search's wall time, trained by the clock
            source = "autoprune-distill" if method in DISTILLED else "autoprune"  # even where the teacher runs live
            searched, note = prior.get(source, {}).get("wall_seconds"), f"of {source}"
            if searched is None or searched != searched:  # no row, or one that failed
                if not config.time_budget:
                    raise AutopruneError(f"{method} needs the {source} row of this seed, or a time budget")
                searched, note = float(config.time_budget), "time budget (no row of its search)"
            charged = kd.seconds if kd else 0.0  # the base's outputs, charged as the search was charged them
            seconds = max(searched - charged - search_seconds, 1e-3)
            note = f"{searched:.0f}s {note}"
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
    """Run every (model, budget, seed, method, time budget) not yet in ``bench.csv``; write the report.

    With ``config.proxy_sweep`` only the proxy sweep runs (:func:`proxy_sweep`), then the report.
    """
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise AutopruneError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    if "fastnas" in config.methods:
        fastnas.require()  # one line, before any work, without nvidia-modelopt
    path = config.out / "bench.csv"
    if config.proxy_sweep:
        proxy_sweep(config)
        frame = _read(path)
        report(frame, config)
        return frame
    device = resolve_device(config.device)
    data = bench_data(config)
    times = time_budgets(config)
    frame = _read(path).dropna(subset=["test_accuracy"])  # runs that failed are tried again
    done = set(zip(frame["model"], frame["budget"].astype(float), frame["seed"].astype(int), frame["method"],
                   row_times(frame, config)))
    for name in config.models:
        whole = _subject(name, data, replace(config, time_budget=times[-1]), device)  # the longest scan
        for time_budget, budget in itertools.product(times, config.budgets):
            timed, subject = replace(config, time_budget=time_budget), at_time(whole, time_budget)
            methods = methods_at(config, time_budget, times)
            try:
                problem = _problem(subject, budget, timed)
            except AutopruneError as err:
                for seed in config.seeds:
                    for method in methods:
                        if (name, float(budget), seed, method, time_budget) not in done:
                            frame = append_rows(path, frame, [{"model": name, "budget": budget, "seed": seed,
                                                               "method": method, "time_budget": time_budget,
                                                               "note": str(err)}])
                continue
            for seed in config.seeds:
                for method in methods:
                    if (name, float(budget), seed, method, time_budget) in done:
                        continue
                    mine = frame[(frame.model == name) & (frame.budget == budget) & (frame.seed == seed)
                                 & (row_times(frame, config) == time_budget)]
                    prior = {r["method"]: r for r in mine.to_dict("records")}
                    try:
                        row = _measure_method(subject, problem, method, seed, timed, prior)
                    except (AutopruneError, NoFit) as err:  # NoFit: uniform's or the seed's plan, as built
                        row = {"note": str(err)}
                    row = {"model": name, "budget": budget, "seed": seed, "method": method,
                           "base_test_accuracy": subject.base_test, **row, "time_budget": time_budget}
                    frame = append_rows(path, frame, [row])
                    if not config.quiet:
                        print(_line(row, subject.data.task))
        _rank_once(subject, config)
    report(frame, config)
    return frame


def time_budgets(config: BenchConfig) -> list[float]:
    """The time budgets to run, shortest first: ``config.time_budgets``, or ``config.time_budget`` alone."""
    if not config.time_budgets:
        return [float(config.time_budget)]
    times = sorted({float(t) for t in config.time_budgets})
    if times[0] <= 0:
        raise AutopruneError("every one of --time-budgets must be more than 0 seconds")
    return times


def row_times(frame: pd.DataFrame, config: BenchConfig) -> pd.Series:
    """Each row's time budget; rows written before every row carried one (floor methods had none) count
    as made at ``config.time_budget``."""
    if "time_budget" not in frame:
        return pd.Series(float(config.time_budget), index=frame.index)
    return pd.to_numeric(frame["time_budget"], errors="coerce").fillna(float(config.time_budget)).astype(float)


def methods_at(config: BenchConfig, time_budget: float, times: Sequence[float]) -> list[str]:
    """The methods run at ``time_budget``: with several time budgets, random only at the longest
    (unless ``config.random_every_time``); autoprune-race only where autoprune does not race already."""
    skip = {"random"} if len(times) > 1 and time_budget != max(times) and not config.random_every_time else set()
    if "autoprune" in config.methods and races(time_budget):
        skip.add("autoprune-race")
    return [m for m in config.methods if m not in skip]


def at_time(subject: Subject, time_budget: float) -> Subject:
    """``subject`` as a run of ``time_budget`` seconds sees it: the sensitivity table cut to the cells a
    scan given :data:`~autoprune.study.halving.SCAN_SHARE` of it would have measured, charged their seconds.

    The scan measures coarse to fine (every group at the largest ratio, then the middle one, ...; within a
    ratio the groups carrying most FLOPs first) and starts no cell past its share, so a run of a shorter
    time budget sees the first cells of the longest budget's scan, in that order, for as long as they
    started within its share. The table a scan of this very budget made is kept whole. Without a time
    budget (the trial-count search), the whole table.
    """
    if not time_budget:
        return subject
    table, costs = subject.table, subject.costs
    order = [round(float(r), 6) for r in coarse_to_fine(subject.space.grid)]
    position = {gid: i for i, gid in enumerate(costs.ids)}

    def key(row: tuple) -> tuple:
        ratio, group = round(float(row[0]), 6), row[1]
        carried = costs.carried_flops(group) if group in position else 0.0
        return (order.index(ratio) if ratio in order else len(order), -carried, position.get(group, len(position)))

    ranked = sorted(table.index, key=lambda i: key((table.at[i, "ratio"], table.at[i, "group"])))
    seconds = table.loc[ranked, "seconds"].astype(float).fillna(0.0)
    started = seconds.cumsum() - seconds  # when each cell started, counting only the cells' own time
    kept = set(started.index[started <= SCAN_SHARE * time_budget + 1e-9])
    cut = table[table.index.isin(kept)].reset_index(drop=True)
    return replace(subject, table=cut, scan_seconds=float(cut["seconds"].sum()))


def seed_matched(subject: Subject, problem: Problem, config: BenchConfig, seed: int) -> dict:
    """The sensitivity seed plan, fine-tuned by the clock for all of the time budget the scan left.

    Time is counted as in a search run: the scan's seconds (``subject.scan_seconds``) are charged first;
    the clock starts before the plan is fitted; the final fine-tune trains until ``time_budget`` minus
    the scan, minus the plan's seconds, minus the scoring reserve a search keeps back
    (:func:`~autoprune.study.halving.scoring_seconds`). Its cut and BatchNorm recalibration come on
    top, as in every method's final fine-tune. No race, no sampler.
    """
    if not config.time_budget:
        raise AutopruneError("seed-matched needs a time budget (--time-budget or --time-budgets)")
    start = time.perf_counter()
    charged = subject.scan_seconds
    deadline = Deadline(config.time_budget - charged)
    reserve = scoring_seconds(subject.eval_seconds, problem.data)
    plan = _seed(problem, config)
    planned = time.perf_counter() - start
    seconds = max(deadline.left() - reserve, 1e-3)
    result = finish(problem, plan, 0.0, seed, None, {}, seconds)
    wall, trained = charged + planned + result.pop("finetune_seconds"), result.pop("final_epochs")
    return {**result, "trials": 0, "pruned": 0, "search_seconds": round(planned, 1),
            "final_epochs": round(trained, 2), "seconds": round(time.perf_counter() - start, 1),
            "wall_seconds": round(wall, 1), "time_budget": config.time_budget, "overhead": float("nan"),
            "plan": json.dumps(plan.to_dict()),
            "note": f"{seconds:.1f}s fine-tune after a {charged:.1f}s scan"}


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
    """Spearman correlation of each proxy with the converged accuracy, per (model, budget): column
    ``PROXY`` holds rho, ``PROXY_p`` its p-value (scipy.stats.spearmanr), for :data:`PROXIES` and the
    sweep's columns (:func:`sweep_columns`) that ``table`` has. A proxy measured on fewer than three
    plans, or constant over them, gets NaN."""
    import warnings

    from scipy.stats import spearmanr

    proxies = [p for p in (*PROXIES, *sweep_columns()) if p in table.columns]
    rows = []
    for (model, budget), part in table.groupby(["model", "budget"], sort=False):
        row = {"model": model, "budget": budget, "plans": len(part), "epochs": part["converged_epochs"].iloc[0],
               "spread": part["converged"].max() - part["converged"].min(), "std": part["converged"].std()}
        for proxy in proxies:
            sign = -1 if proxy == "kd_loss" else 1  # a lower loss should mean a better plan
            both = part[[proxy, "converged"]].apply(pd.to_numeric, errors="coerce").dropna()
            rho = p = float("nan")
            if len(both) >= 3 and both[proxy].nunique() > 1 and both["converged"].nunique() > 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    found = spearmanr(sign * both[proxy], both["converged"])
                rho, p = float(found.statistic), float(found.pvalue)
            row[proxy], row[f"{proxy}_p"] = rho, p
        rows.append(row)
    return pd.DataFrame(rows)


RANKS_RHO = 0.5  # a proxy ranks where Spearman's rho with the converged accuracy is at least this ...
RANKS_P = 0.05  # ... and its p-value below this


def proxy_that_ranks(proxies: pd.DataFrame, model: str, budget: float) -> str | None:
    """The proxy that ranks plans of ``model`` at ``budget`` (rho >= :data:`RANKS_RHO`, p < :data:`RANKS_P`
    against the converged accuracy, :func:`proxy_table` of ``proxies.csv``), the highest rho if several;
    None where none does. Only such a proxy may screen candidates before any fine-tune (nothing does yet)."""
    table = proxy_table(proxies)
    rows = table[(table["model"] == model) & (table["budget"].astype(float) == float(budget))]
    if not len(rows):
        return None
    row = rows.iloc[0]
    ranking = {p: row[p] for p in (*PROXIES, *sweep_columns())
               if p in row and row[p] >= RANKS_RHO and row[f"{p}_p"] < RANKS_P}
    return max(ranking, key=ranking.get) if ranking else None


SWEEP_BATCHES = (2, 8, 32, 100)  # BatchNorm recalibration batches the sweep tries
SWEEP_SPLITS = {f"s{SCORE_IMAGES}": "score", "sall": "val"}  # scored on the score split, and on all of val


def sweep_columns() -> list[str]:
    """``proxies.csv``'s sweep columns: ``bn_score_b{batches}_s1000`` and ``..._sall``."""
    return [f"bn_score_b{b}_{s}" for b in SWEEP_BATCHES for s in SWEEP_SPLITS]


def sweep_scores(groups: ChannelGroups, plan: Plan, data: Data, device: torch.device, index: int) -> dict:
    """One plan's BatchNorm-recalibrated scores at every :data:`SWEEP_BATCHES` on every split.

    The plan is cut once from the base; each recalibration starts the statistics afresh (a plain
    average over its batches) from the same shuffled training batches :func:`measure_proxies` used
    for this plan (seed ``index``), so ``bn_score_b2_s1000`` repeats its ``bn_score``.
    """
    model = groups.apply(plan).to(device)
    scores = {}
    for batches in SWEEP_BATCHES:  # a fresh loader each time: the same first batches, more of them
        loader = data.loader("train", Settings(seed=index).batch_size, shuffle=True, seed=index)
        recalibrate_bn(model, loader, device, batches, task=data.task)
        for label, split in SWEEP_SPLITS.items():
            scores[f"bn_score_b{batches}_{label}"] = evaluate(model, data.loader(split, 256), device, data.task)
    return scores


def proxy_sweep(config: BenchConfig) -> pd.DataFrame:
    """Add :func:`sweep_columns` to the rows of ``proxies.csv`` that lack them (``--proxy-sweep``).

    Each row's stored plan is cut again from the same base weights (``out/cache/DATASET/MODEL/base.pt``,
    checked against the plan's base-model fingerprint) and scored by :func:`sweep_scores`: no
    fine-tune. The file is rewritten after each plan, so a killed sweep goes on and a rerun adds nothing.
    """
    path = config.out / "proxies.csv"
    table = _read_any(path)
    if not len(table):
        raise AutopruneError(f"no {path} to sweep: measure the proxies first (--rank-plans N)")
    columns = sweep_columns()
    for column in columns:
        if column not in table:
            table[column] = float("nan")
    todo = table.index[table[columns].isna().any(axis=1) & table["plan"].notna()]
    if not len(todo):
        return table
    device = resolve_device(config.device)
    data = bench_data(config)
    for name in dict.fromkeys(table.loc[todo, "model"]):
        groups = _base_groups(name, data, config, device)
        for i in todo[table.loc[todo, "model"] == name]:
            plan = Plan.from_dict(json.loads(table.at[i, "plan"]))
            if plan.base_model and plan.base_model != groups.base_model:
                raise AutopruneError(f"{path} row {i}: its plan was cut from base {plan.base_model}, not from "
                                     f"the cached {groups.base_model}")
            index = int(table.at[i, "plan_index"]) if "plan_index" in table else int(i)
            for column, value in sweep_scores(groups, plan, data, device, index).items():
                table.at[i, column] = value
            with atomic_path(path) as tmp:
                table.to_csv(tmp, index=False)
            if not config.quiet:
                print(f"{name} flops={table.at[i, 'budget']:g} plan {index}: "
                      + ", ".join(f"{c.removeprefix('bn_score_')} {table.at[i, c]:.4f}" for c in columns))
    return table


def _base_groups(name: str, data: Data, config: BenchConfig, device: torch.device) -> ChannelGroups:
    """The cached base model's channel groups (the proxies' plans were cut from it); no training, no scan."""
    weights = config.out / "cache" / data.name / Path(name).stem / "base.pt"
    if not weights.is_file():
        raise AutopruneError(f"no base weights at {weights}: the sweep re-cuts plans from the base they came from")
    model = build_model(name, data.num_classes, input_shape=data.input_shape)
    load_weights(model, weights)
    model = model.to(device).eval()
    space = resolve(None, name).replace(grid=tuple(config.grid), max_ratio=config.max_ratio)
    return find_groups(model, data.example_input(), space, data, DEFAULTS.batch_size, 0,
                       base_model=fingerprint(model.state_dict()), device=device)


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
    """Write ``BENCHMARKS.md`` and ``bench.png`` from every row measured so far (those of
    ``config.time_budget``), and the anytime section and ``anytime.png`` where rows span time budgets."""
    frame = _with_columns(frame)
    whole, frame = frame, frame[row_times(frame, config) == float(config.time_budget)]
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
            if config.time_budget and scan["seconds"].sum() > SCAN_SHARE * config.time_budget + scan["seconds"].max():
                lines[-1] += (f" It was measured for a longer time budget: the {config.time_budget:g} s rows see and "
                              f"are charged only the cells a {SCAN_SHARE * config.time_budget:g} s scan reaches.")
        failed = frame[(frame.model == model) & frame["test_accuracy"].isna()]
        for row in failed.drop_duplicates(["budget", "method"]).itertuples():
            lines.append(f"\n{row.method} at flops={row.budget:g}: {row.note}")
        lines.append("")
    lines += [f"![test {task.name} against FLOPs](bench.png)", ""]
    curve = anytime_table(whole, row_times(whole, config), METHODS)
    lines += anytime_lines(curve, task)
    proxies = _read_any(config.out / "proxies.csv")
    if len(proxies):
        lines += _proxy_lines(proxies)
    lines += own_sections(config.out / "BENCHMARKS.md")  # autoprune bench-latency's, with their commands
    write_text(config.out / "BENCHMARKS.md", "\n".join(lines))
    _plot(table, config.out / "bench.png", task)
    plot_anytime(curve, config.out / "anytime.png", task, METHODS)


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
             "a proxy can only rank what is wider than the seed-to-seed spread. Each cell: rho (p-value). "
             f"A proxy **ranks** where rho >= {RANKS_RHO:g} and p < {RANKS_P:g}; only then may a search screen "
             "candidates with it before any fine-tune.", "",
             "| model | budget | plans | converged epochs | spread | std | " + " | ".join(names.values()) + " |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    table = proxy_table(proxies)
    for row in table.to_dict("records"):
        lines.append(f"| {row['model']} | {row['budget']:g} | {row['plans']} | {row['epochs']:g} | "
                     f"{100 * row['spread']:.2f} | {100 * row['std']:.2f} | "
                     + " | ".join(_rho(row, p) for p in names) + " |")
    swept = [c for c in sweep_columns() if c in table]
    if swept:
        lines += ["", "The score after BatchNorm recalibration, by recalibration batches (b) and scoring images "
                  f"(s{SCORE_IMAGES}: the score split, a fixed random {SCORE_IMAGES:,} of the validation images; "
                  "sall: all of them), each plan cut again from the same base (`autoprune bench --proxy-sweep`); "
                  "rho (p-value) against the converged accuracy:", "",
                  "| model | budget | plans | " + " | ".join(c.removeprefix("bn_score_") for c in swept) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in swept) + " |"]
        for row in table.to_dict("records"):
            lines.append(f"| {row['model']} | {row['budget']:g} | {row['plans']} | "
                         + " | ".join(_rho(row, c) for c in swept) + " |")
    lines += ["", "Ranks: " + "; ".join(f"{r['model']} at {r['budget']:g}: "
                                        f"{proxy_that_ranks(proxies, r['model'], r['budget']) or 'none'}"
                                        for r in table.to_dict("records")) + "."]
    seconds = proxies[[f"seconds_{p}" for p in PHASES]].mean()
    cut = sum(seconds[f"seconds_{p}"] for p in PHASES[:3])
    lines += ["", "Where a trial's time goes, seconds per cut (mean over those plans): "
              + ", ".join(f"{p} {seconds[f'seconds_{p}']:.3f}" for p in PHASES)
              + f"; cutting (projection, surgery, thop check) is {cut / seconds.sum():.1%} of it.", ""]
    return lines


def _rho(row: dict, proxy: str) -> str:
    rho, p = row.get(proxy, float("nan")), row.get(f"{proxy}_p", float("nan"))
    return "" if rho != rho else f"{rho:.2f} ({p:.2g})"


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
                            marker="o", capsize=3, label=method, color=f"C{colour % 10}",
                            linestyle="--" if colour >= 10 else "-")  # past ten methods, colours repeat
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
