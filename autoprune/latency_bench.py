"""How well the latency predictor predicts: random plans, predicted against timed end to end.

For each model and setting (backend, batch; one thread) the predictor's table is
built (or read from its cache), then ``plans`` random plans, rounded as the
model's search space rounds them, are predicted and timed whole against the
base (:class:`autoprune.latency.Meter`). Rows go to ``latency.csv`` as they are
measured, so a killed run goes on; :func:`table_lines` is the table
``BENCHMARKS.md`` shows.

Example (the command of record)::

    autoprune bench-latency --models resnet18,mobilenet_v2 --batches 1,32 --backends torch,onnxruntime
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .budget import keep_counts
from .costmodel import CostModel
from .files import atomic_path
from .groups import ChannelGroups
from .latency import LatencyModel, LatencySettings, Meter, Timer
from .models import build_model
from .space import resolve

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
    predictor = LatencyModel(groups, costs, meter)
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
                frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True) if len(frame) else \
                    pd.DataFrame(rows)
                out.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    frame.to_csv(tmp, index=False)
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
    lines = ["## Does the latency predictor predict?", "",
             "Random plans (a uniform random ratio per group, rounded as the model's search space rounds), "
             "their latency predicted from the per-layer table and timed whole, interleaved with the base model "
             "(median ratio to the base, times the base's latency), CPU, one thread; error: predicted / measured "
             "- 1. Target: median |error| under 10 %, 90th percentile under 20 %. 'table s': building the table "
             "(0 where it came from the cache).", "",
             "| model | backend | batch | plans | base ms | measured ms | median abs error | 90th pct | "
             "timing spread ms | table s | predict µs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary(frame).itertuples():
        lines.append(f"| {row.model} | {row.backend} | {row.batch} | {row.plans} | {row.base_ms:.2f} | "
                     f"{row.measured_lo:.2f}–{row.measured_hi:.2f} | {row.median:.1%} | {row.p90:.1%} | "
                     f"{row.spread:.3f} | {row.table_seconds:.0f} | {row.predict_us:.0f} |")
    return lines + [""]
