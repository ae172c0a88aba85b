"""How much accuracy each group loses when pruned alone, and what that says about the search.

For every group and every ratio on a grid, prune only that group, recalibrate
BatchNorm on a few training batches and measure validation accuracy. The table
is rewritten after every cell, so a scan that is killed resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from autoprune.cost.budget import fits, keep_counts, project, smallest
from autoprune.cost.costmodel import CostModel
from autoprune.counting import Cost
from autoprune.files import atomic_path
from autoprune.inputs.data import Data
from autoprune.prune.groups import ChannelGroups
from autoprune.train.loop import evaluate, recalibrate_bn

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COLUMNS = ["base_model", "importance", "group", "ratio", "channels", "kept", "flops_share",
           "val_accuracy", "drop", "seconds"]


def _read(path: Path) -> pd.DataFrame:
    if path.is_file():
        try:
            return pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            pass
    return pd.DataFrame(columns=COLUMNS)


def _write(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


class SharedRows(Protocol):
    """Where workers share finished cells (:class:`autoprune.study.storage.SharedTable`)."""

    def rows(self) -> list[dict]: ...

    def add(self, row: dict) -> None: ...

    def claim(self, base_model: str, importance: str, group: str, ratio: float) -> bool: ...


KEY = ["base_model", "importance", "group", "ratio"]


def _merge(table: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """``table`` plus the cells of ``rows`` it lacks (a cell is measured once)."""
    if not rows:
        return table
    extra = pd.DataFrame(rows, columns=COLUMNS)
    both = pd.concat([table, extra], ignore_index=True) if len(table) else extra
    cell = both[KEY[:3]].astype(str).agg("|".join, axis=1) + "|" + both["ratio"].astype(float).round(6).astype(str)
    return both[~cell.duplicated()].reset_index(drop=True)


def scan(
    groups: ChannelGroups,
    costs: CostModel,
    model: nn.Module,
    data: Data,
    base_accuracy: float,
    device: torch.device,
    path: str | Path,
    grid: Sequence[float] = GRID,
    bn_batches: int = 8,
    batch_size: int = 64,
    quiet: bool = False,
    round_to: int = 1,
    shared: SharedRows | None = None,
    seconds: float | None = None,
) -> pd.DataFrame:
    """Fill ``path`` (sensitivity.csv) with one row per (group, ratio); reuse finished rows.

    Cells are scored on ``data.score`` (a fixed subset of a large validation
    split); ``base_accuracy`` is the base model's accuracy there. Each cell keeps the channel count a plan at that ratio would keep (rounded
    to ``round_to`` and the group's blocks, as the search rounds it). With
    ``shared`` (the study), cells measured by any worker are taken from it
    and each new cell is added to it, so workers on other machines skip them.
    Workers scanning at once claim cells first and measure the ones others
    claimed only if those are still missing at the end (their worker may have
    died). With ``seconds`` (a time budget's share) the scan starts no cell
    after that many seconds, measuring the grid coarse to fine (every group at
    the largest ratio, then the middle one, …) so that what it has is spread
    over the grid. Returns the rows for this base model and importance criterion.
    """
    stop = time.perf_counter() + seconds if seconds is not None else float("inf")
    path = Path(path)
    table = _merge(_read(path), shared.rows() if shared else [])

    def done() -> set[tuple[str, float]]:
        mine = (table["base_model"].astype(str) == groups.base_model) & (table["importance"] == groups.importance)
        return {(g, round(float(r), 6)) for g, r in zip(table.loc[mine, "group"], table.loc[mine, "ratio"])}

    finished = done()
    cells = [(g, r) for g in groups for r in grid if (g.id, round(r, 6)) not in finished]
    if seconds is not None:  # ratio by ratio, coarse to fine, so a scan cut short still spans the grid;
        order = coarse_to_fine(grid)  # within a ratio the groups that carry most FLOPs first: they decide the plan
        cells.sort(key=lambda cell: (order.index(cell[1]), -costs.carried_flops(cell[0].id)))
    if shared:  # cells claimed by nobody else first, then whatever is still missing
        mine = [c for c in cells if shared.claim(groups.base_model, groups.importance, c[0].id, c[1])]
        cells = mine + [c for c in cells if c not in mine]
    train_loader = data.loader("train", batch_size=batch_size, shuffle=True)
    val_loader = data.loader("score", batch_size=256)
    for group, ratio in tqdm(cells, desc="sensitivity", disable=quiet or not cells, unit="cell"):
        if time.perf_counter() > stop:
            break
        if shared:  # another worker may have measured it meanwhile
            table = _merge(table, shared.rows())
            if (group.id, round(ratio, 6)) in done():
                continue
        start = time.perf_counter()
        kept = groups.round_keep(group.id, group.channels * (1 - ratio), round_to)
        keep = {group.id: kept}
        pruned = groups.apply(groups.plan(keep)).to(device)
        torch.manual_seed(0)
        recalibrate_bn(pruned, train_loader, device, bn_batches, task=data.task)
        accuracy = evaluate(pruned, val_loader, device, data.task)
        row = {"base_model": groups.base_model, "importance": groups.importance, "group": group.id,
               "ratio": float(ratio), "channels": int(group.channels), "kept": int(kept),
               "flops_share": float(costs.predict(keep).flops / costs.base.flops),
               "val_accuracy": float(accuracy), "drop": float(base_accuracy - accuracy),
               "seconds": round(time.perf_counter() - start, 3)}
        if shared:
            shared.add(row)
        table = _merge(table, [row])
        _write(table, path)
    if shared:  # the study's measurement of a cell wins, so every worker reads the same table
        merged = _merge(pd.DataFrame(shared.rows(), columns=COLUMNS), table.to_dict("records"))
        if not merged.equals(_read(path)):
            _write(merged, path)
        table = merged
    mine = (table["base_model"].astype(str) == groups.base_model) & (table["importance"] == groups.importance)
    return table[mine].reset_index(drop=True)


def coarse_to_fine(grid: Sequence[float]) -> list[float]:
    """The grid's ratios in an order that covers it evenly at any length: the largest, the middle, …"""
    ordered = sorted(grid)
    picked: list[int] = [len(ordered) - 1]
    spans = [(0, len(ordered) - 1)]
    if len(ordered) > 1:
        picked.append(0)
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            picked.append(mid)
            spans += [(mid, hi), (lo, mid)]
    return [ordered[i] for i in dict.fromkeys(picked)]


def curves(table: pd.DataFrame, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per group, ratios (from 0) and the accuracy drop at each, made non-decreasing.

    A group the scan did not reach (a time budget cut it short) gets the mean
    curve of the groups it did reach: taken as averagely sensitive, rather than
    as never to be pruned.
    """
    found = {}
    typical = table.groupby("ratio", as_index=False)["drop"].mean()
    for gid in ids:
        rows = table[table["group"] == gid].sort_values("ratio")
        rows = rows if len(rows) else typical.sort_values("ratio")
        ratios = np.concatenate([[0.0], rows["ratio"].to_numpy(float)])
        drops = np.maximum.accumulate(np.concatenate([[0.0], np.maximum(rows["drop"].to_numpy(float), 0)]))
        found[gid] = (ratios, drops)
    return found


def ratio_at_drop(curve: tuple[np.ndarray, np.ndarray], drop: float) -> float:
    """The largest ratio whose (interpolated) drop stays within ``drop``."""
    ratios, drops = curve
    if drop >= drops[-1]:
        return float(ratios[-1])
    above = int(np.argmax(drops > drop))
    r0, r1, d0, d1 = ratios[above - 1], ratios[above], drops[above - 1], drops[above]
    return float(r0 + (r1 - r0) * (drop - d0) / (d1 - d0)) if d1 > d0 else float(r0)


def bounds(
    table: pd.DataFrame,
    costs: CostModel,
    limits: Cost,
    high: float | np.ndarray,
    room: float = 0.7,
    round_to: int = 1,
) -> np.ndarray:
    """Upper ratio bound per group: as far as it can go before its accuracy collapses.

    ``high`` is the ceiling (one for all groups, or one per group). The tolerated drop is the smallest that still lets the budget be met with
    room to spare (the cheapest model within the bounds costs at most ``room``
    of the budget), so fragile groups are protected only as far as the budget allows.
    """
    found = curves(table, costs.ids)
    ceiling = np.broadcast_to(np.asarray(high, dtype=float), (len(costs.ids),)).copy()
    roomy = Cost(limits.flops * room, limits.params * room, limits.latency * room)
    for tolerance in sorted({0.0, *np.concatenate([d for _, d in found.values()])}):
        # A group that stays within the tolerance over the whole grid may go to its ceiling.
        caps = np.array([top if tolerance >= found[g][1][-1] else min(top, ratio_at_drop(found[g], tolerance))
                         for g, top in zip(costs.ids, ceiling)])
        caps = np.maximum(caps, np.minimum(0.1, ceiling))
        if fits(smallest(costs, caps, round_to), roomy):
            return caps
    return ceiling


def equal_drop(
    table: pd.DataFrame, costs: CostModel, limits: Cost, low: np.ndarray, high: np.ndarray, round_to: int = 1
) -> np.ndarray:
    """The allocation that gives every group the same accuracy drop and just meets the budget.

    Bisects the common drop; each group is pruned as far as that drop allows.
    Returns pruning ratios in ``costs.ids`` order.
    """
    found = curves(table, costs.ids)

    def ratios(drop: float) -> np.ndarray:
        return np.clip([ratio_at_drop(found[g], drop) for g in costs.ids], low, high)

    lo, hi = 0.0, max(float(d.max()) for _, d in found.values()) + 1e-9
    for _ in range(40):
        mid = (lo + hi) / 2
        if fits(costs.predict_vector(keep_counts(costs, ratios(mid), round_to)), limits):
            hi = mid
        else:
            lo = mid
    kept = project(costs, ratios(hi), limits, low, high, round_to)
    return 1.0 - kept / costs.channels
