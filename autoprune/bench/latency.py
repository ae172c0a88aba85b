"""How well the latency predictor predicts: random plans, predicted against timed end to end.

For each model and setting (backend, batch; one thread) the predictor's table is
built (or read from its cache), then ``plans`` random plans, rounded as the
model's search space rounds them, are predicted and timed whole against the
base (:class:`autoprune.cost.latency.Meter`). Rows go to ``latency.csv`` as they are
measured, so a killed run goes on; :func:`table_lines` is the table
``BENCHMARKS.md`` shows.

Example (the command of record)::

    autoprune bench-latency --models resnet18,mobilenet_v2 --batches 1,32 --backends torch,onnxruntime
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from autoprune.api import search
from autoprune.bench.equal_time import BenchConfig, bench_data
from autoprune.bench.markdown import HEADINGS, section
from autoprune.cost.budget import keep_counts, parse_budget
from autoprune.cost.costmodel import CostModel
from autoprune.cost.latency import LatencyModel, LatencySettings, Meter, Timer
from autoprune.errors import AutopruneError
from autoprune.files import append_rows
from autoprune.inputs.data import Data
from autoprune.inputs.models import build_model, load_weights
from autoprune.options import SearchOptions
from autoprune.prune.groups import ChannelGroups
from autoprune.study.space import resolve

COLUMNS = ["model", "backend", "batch", "threads", "plan_index", "predicted_ms", "measured_ms", "spread_ms",
           "base_ms", "flops_share", "error", "table_seconds", "predict_us"]


def _random_keeps(costs: CostModel, round_to: int, max_ratio: float, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random plans: a uniform random ratio per group, rounded as the search rounds channels."""
    rng = np.random.default_rng(seed)
    return [keep_counts(costs, rng.uniform(0, max_ratio, len(costs.ids)), round_to) for _ in range(count)]


def predictor_accuracy(name: str, settings: LatencySettings, plans: int, seed: int = 0, num_classes: int = 10,
                       timer: Timer | None = None, done: int = 0) -> list[dict]:
    """Rows ``done`` to ``plans`` of one model and setting: each plan's predicted and measured latency."""
    model = build_model(name, num_classes, input_shape=settings.input_shape).eval()
    groups = ChannelGroups(model, settings.inputs()[:1])
    costs = CostModel(groups)
    space = resolve(None, name)
    clock = time.perf_counter()
    meter = Meter(model, settings, timer)
    predictor = LatencyModel(groups, costs, meter, round_to=space.round_to)
    table_seconds = time.perf_counter() - clock
    rows = []
    for index, keep in enumerate(_random_keeps(costs, space.round_to, space.max_ratio, plans, seed)):
        if index < done:
            continue
        clock = time.perf_counter()
        predicted = predictor.predict_vector(keep)
        predict_us = 1e6 * (time.perf_counter() - clock)
        plan = groups.plan(dict(zip(costs.ids, keep.astype(int).tolist())))
        timing = meter.time(groups.apply(plan).eval())
        flops = costs.predict_vector(keep)[0] / costs.base.flops
        rows.append({"model": name, "backend": settings.backend, "batch": settings.batch,
                     "threads": settings.threads, "plan_index": index, "predicted_ms": predicted,
                     "measured_ms": timing.ms, "spread_ms": timing.spread_ms, "base_ms": meter.base_ms,
                     "flops_share": flops, "error": predicted / timing.ms - 1, "table_seconds": table_seconds,
                     "predict_us": predict_us})
    return rows


def bench_latency(models: Sequence[str], backends: Sequence[str], batches: Sequence[int], plans: int = 30,
                  threads: int = 1, out: Path = Path("results/benchmarks"), quiet: bool = False,
                  timer: Timer | None = None) -> pd.DataFrame:
    """Measure every (model, backend, batch) not yet complete in ``out/latency.csv``; return all rows."""
    path = out / "latency.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)
    for name in models:
        for backend in backends:
            for batch in batches:
                mine = frame[(frame.model == name) & (frame.backend == backend) & (frame.batch == batch)]
                if len(mine) >= plans:
                    continue
                settings = LatencySettings(backend, batch, threads, "cpu", (3, 32, 32))
                rows = predictor_accuracy(name, settings, plans, timer=timer, done=len(mine))
                frame = append_rows(path, frame, rows)
                if not quiet:
                    errors = np.abs(pd.DataFrame(rows)["error"]) if rows else np.array([np.nan])
                    print(f"{name} {backend} batch {batch}: median |error| {np.median(errors):.1%}, "
                          f"90th percentile {np.percentile(errors, 90):.1%} over {len(rows)} new plans")
    return frame


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (model, backend, batch): plans, base latency, median and 90th-percentile |error|, table and predict cost."""
    errors = frame.assign(abs_error=frame["error"].abs())
    return errors.groupby(["model", "backend", "batch"], sort=False).agg(
        plans=("abs_error", "size"), base_ms=("base_ms", "first"),
        measured_lo=("measured_ms", "min"), measured_hi=("measured_ms", "max"),
        median=("abs_error", "median"), p90=("abs_error", lambda e: float(np.percentile(e, 90))),
        spread=("spread_ms", "median"), table_seconds=("table_seconds", "first"),
        predict_us=("predict_us", "median")).reset_index()


def table_lines(frame: pd.DataFrame) -> list[str]:
    """The predictor-accuracy section of ``BENCHMARKS.md``."""
    lines = section(HEADINGS[0],
             "Random plans (a uniform random ratio per group, rounded as the model's search space rounds), "
             "their latency predicted from the per-layer table and timed whole, interleaved with the base model "
             "(median ratio to the base, times the base's latency), CPU, one thread; error: predicted / measured "
             "- 1. Target: median |error| under 10 %, 90th percentile under 20 %. 'table s': building the table "
             "(0 where it came from the cache).",
             ["model", "backend", "batch", "plans", "base ms", "measured ms", "median abs error", "90th pct",
              "timing spread ms", "table s", "predict µs"])
    for row in summary(frame).itertuples():
        lines.append(f"| {row.model} | {row.backend} | {row.batch} | {row.plans} | {row.base_ms:.2f} | "
                     f"{row.measured_lo:.2f}–{row.measured_hi:.2f} | {row.median:.1%} | {row.p90:.1%} | "
                     f"{row.spread:.3f} | {row.table_seconds:.0f} | {row.predict_us:.0f} |")
    return lines + [""]


SEARCH_COLUMNS = ["model", "flops_budget", "seed", "kind", "budget", "test_accuracy", "val_accuracy", "base_test_accuracy",
                  "flops_share", "search_latency_ms", "latency_ms", "latency_spread_ms", "base_ms", "cap_ms",
                  "share_of_cap", "check_share_of_cap", "trials", "seconds"]


def latency_searches(name: str, flops: float, seeds: Sequence[int], options: SearchOptions,
                     out: Path = Path("results/benchmarks"), quiet: bool = False, data: Data | None = None,
                     weights: Path | None = None) -> pd.DataFrame:
    """Is a latency budget worth it? Per seed, the FLOPs-budgeted search at ``flops``, then the
    latency-budgeted search capped at the latency that search's winner measured (as a share of the
    base's); then both winners are timed afresh, together, against the base (after export, by a new
    :class:`Meter`).

    Both searches start from the benchmark's cached base model and data (``bench --models name``
    makes them) and run the same ``options`` (trials, epochs); the latency search also pays for
    timing its candidates. Rows go to ``out/latency_search.csv`` as each seed ends, so a killed run
    goes on with the next seed.
    """
    import torch

    options.check()
    budget = parse_budget(f"flops={flops:g}")  # a bad budget or option is refused before any data is loaded
    path = out / "latency_search.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=SEARCH_COLUMNS)
    data = data or bench_data(BenchConfig(out=out))
    weights = weights or out / "cache" / data.name / Path(name).stem / "base.pt"
    if not weights.is_file():
        raise AutopruneError(f"{weights} does not exist; make the benchmark's base model first: "
                             f"autoprune bench --models {name} --methods uniform --seeds 0")
    base = load_weights(build_model(name, data.num_classes, input_shape=data.input_shape), weights).eval()
    settings = LatencySettings(options.latency_backend, options.latency_batch, options.latency_threads, "cpu",
                               data.input_shape)
    for seed in seeds:
        if ((frame["model"] == name) & (frame["flops_budget"] == flops) & (frame["seed"] == seed)).sum() >= 2:
            continue
        runs = out / "latency-searches" / f"{Path(name).stem}-flops{flops:g}-seed{seed}"
        common = dict(weights=str(weights), seed=seed, quiet=quiet, device="cpu")
        by_flops = search(name, data, budget, options, out=runs / "flops", **common)
        # A share of the base, not milliseconds: each search times its base at its start, and load then
        # (another process, this machine's own noise) moves every millisecond figure of that run alike.
        share = _round_up(by_flops.summary["latency"]["share"])
        (runs / "latency").mkdir(parents=True, exist_ok=True)  # the same base: its sensitivity table serves
        if not (runs / "latency" / "sensitivity.csv").is_file():
            (runs / "latency" / "sensitivity.csv").write_bytes((runs / "flops" / "sensitivity.csv").read_bytes())
        by_latency = search(name, data, f"latency={share:g}", options, out=runs / "latency", **common)
        meter = Meter(base, settings, options.latency_timer)
        rows = []
        for kind, result in (("flops", by_flops), ("latency", by_latency)):
            timing, s = meter.time(torch.load(result.out / "model.pt", weights_only=False).eval()), result.summary
            rows.append({"model": name, "flops_budget": flops, "seed": seed, "kind": kind, "budget": s["budget"],
                         "test_accuracy": s["test_accuracy"], "val_accuracy": s["val_accuracy"],
                         "base_test_accuracy": s["base_test_accuracy"], "flops_share": s["flops_share"],
                         "search_latency_ms": s["latency"]["ms"], "latency_ms": timing.ms,
                         "latency_spread_ms": timing.spread_ms, "base_ms": meter.base_ms,
                         "cap_ms": share * meter.base_ms, "share_of_cap": timing.ms / (share * meter.base_ms),
                         "check_share_of_cap": s.get("latency_check", {}).get("share_of_limit", float("nan")),
                         "trials": s["trials"], "seconds": s["seconds"]})
        frame = append_rows(path, frame, rows)
        if not quiet:
            f, l = rows
            print(f"{name} seed {seed}: flops={flops:g} → {f['latency_ms']:.3g} ms, test {f['test_accuracy']:.2%}; "
                  f"latency={share:g} → {l['latency_ms']:.3g} ms ({l['share_of_cap']:.0%} of the cap), "
                  f"FLOPs {l['flops_share']:.1%}, test {l['test_accuracy']:.2%}")
    return frame


def _round_up(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits, rounded up: a cap below the FLOPs winner's latency
    would exclude the very model it is compared with."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def search_lines(frame: pd.DataFrame) -> list[str]:
    """The latency-against-FLOPs budget section of ``BENCHMARKS.md``."""
    lines = section(HEADINGS[1],
             "Per seed: the FLOPs-budgeted search, then the latency-budgeted search capped at the latency the "
             "first one's winner measured (its share of the base's, which load does not move), same base, data, "
             "trials and epochs. Latencies are re-timed after export, both winners and the base in one interleaved loop (torch, CPU, batch 1, one thread). "
             "'of cap': the latency winner's re-timed latency over its cap (target: 90-100 %); 'check': the "
             "same, as the search itself re-timed it right after export; 'drift': the FLOPs winner re-timed "
             "here over its latency as its search measured it (how far this loop's timing is from the "
             "searches').",
             ["model", "seed", "FLOPs budget: FLOPs", "ms", "test", "latency cap", "FLOPs", "ms (of cap)", "check",
              "test", "test gain", "drift"])
    gains = []
    for (model, _, seed), pair in frame.groupby(["model", "flops_budget", "seed"], sort=False):
        if set(pair["kind"]) != {"flops", "latency"}:
            continue
        f, l = (pair[pair["kind"] == k].iloc[0] for k in ("flops", "latency"))
        gains.append(l.test_accuracy - f.test_accuracy)
        share = float(l.budget.split("=")[1])
        lines.append(f"| {model} | {seed} | {f.flops_share:.1%} | {f.latency_ms:.3g} | {f.test_accuracy:.2%} | "
                     f"{share:.1%} of base, {l.cap_ms:.3g} ms | {l.flops_share:.1%} | {l.latency_ms:.3g} "
                     f"({l.share_of_cap:.0%}) | {l.check_share_of_cap:.0%} | {l.test_accuracy:.2%} | "
                     f"{100 * gains[-1]:+.2f} | {f.share_of_cap:.0%} |")
    if len(gains) > 1:
        lines.append(f"| mean ± std | | | | | | | | | | {100 * np.mean(gains):+.2f} ± "
                     f"{100 * np.std(gains, ddof=1):.2f} | |")
    return lines + [""]
