"""The anytime curve: test accuracy against wall time, per (model, budget), one line per method.

``autoprune bench --time-budgets 2m,10m,30m`` runs each method at each wall
time; its rows in ``bench.csv`` carry their ``time_budget``. This module turns
them into the ``BENCHMARKS.md`` section (a table) and ``anytime.png``; it reads
rows only, so the report can draw it from whatever has been measured so far.

Example:
    >>> duration_label(120), duration_label(1800), duration_label(20), duration_label(5400)
    ('2m', '30m', '20s', '1h30m')
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from autoprune.files import atomic_path
from autoprune.inputs.task import Task

# The curve's methods, in the order they run: uniform-matched needs that time budget's autoprune row first.
ANYTIME_METHODS = ("seed-matched", "autoprune", "autoprune-race", "uniform-matched", "random")
ON_REQUEST = ("autoprune-distill", "uniform-matched-distill")  # drawn even where run at one time budget only
HEADING = "## Accuracy against wall time (anytime)"


def duration_label(seconds: float) -> str:
    """``120`` -> ``2m``: a time budget as ``--time-budgets`` would take it."""
    seconds = float(seconds)
    if seconds % 60:
        return f"{seconds:g}s"
    hours, minutes = divmod(int(seconds) // 60, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes or not hours else "")


def anytime_table(frame: pd.DataFrame, times: pd.Series, order: Sequence[str]) -> pd.DataFrame:
    """Mean and spread of test accuracy over seeds per (model, budget, method, time budget).

    ``times`` is each row's time budget (legacy rows' filled in by the caller).
    Methods: those of :data:`ANYTIME_METHODS` and :data:`ON_REQUEST` and any other measured at more
    than one time budget (the floor methods, measured at one, are left out).
    Empty unless the rows span at least two time budgets. Methods in :data:`ANYTIME_METHODS`'s order,
    then ``order``'s.
    """
    rows = frame.assign(time_budget=times).dropna(subset=["test_accuracy", "time_budget"])
    if rows["time_budget"].nunique() < 2:
        return pd.DataFrame()
    spans = rows.groupby("method")["time_budget"].nunique()
    rows = rows[rows["method"].isin(ANYTIME_METHODS + ON_REQUEST) | rows["method"].map(spans).gt(1)]
    table = rows.groupby(["model", "budget", "method", "time_budget"], sort=False).agg(
        test_mean=("test_accuracy", "mean"), test_std=("test_accuracy", "std"), runs=("test_accuracy", "size"),
        wall=("wall_seconds", "mean"), epochs=("final_epochs", "mean"), trials=("trials", "mean")).reset_index()
    rank = {method: i for i, method in enumerate(dict.fromkeys([*ANYTIME_METHODS, *ON_REQUEST, *order]))}
    table = table.sort_values(["model", "budget", "method", "time_budget"], ascending=[True, False, True, True],
                              kind="stable", key=lambda c: c.map(rank) if c.name == "method" else c)
    return table.reset_index(drop=True).fillna({"test_std": 0.0})


def anytime_lines(table: pd.DataFrame, task: Task, picture: str = "anytime.png") -> list[str]:
    """The ``BENCHMARKS.md`` section: one row per (model, budget, method), one column per time budget."""
    if table.empty:
        return []
    times = sorted(table["time_budget"].unique())
    labels = [duration_label(t) for t in times]
    lines = [HEADING, "",
             "Each method run at each wall time (`autoprune bench --time-budgets`), the sensitivity scan's share "
             "of that time included: `autoprune` (without distillation: scan, successive halving and final "
             "fine-tune under 10 minutes; from 10 minutes on, the seed checked against uniform, then fine-tuned), "
             "`autoprune-distill` (the same, distilling from the base model's cached outputs: the default for a "
             "classifier), "
             "`autoprune-race` (`--race`: the race where the default does not race), `seed-matched` (the "
             "sensitivity seed plan alone, no race, fine-tuned by the clock for all the time the scan left), "
             "`uniform-matched` (the uniform plan fine-tuned as long as that time budget's autoprune run took; "
             "`-distill`: distilled, as long as autoprune-distill took) "
             "and `random` (Optuna's random sampler in autoprune's place, at the longest time budget only unless "
             "asked). The race against seed-matched is what the race and the sampler add. Test "
             f"{task.name}: mean ± std over seeds (runs); in brackets, the candidates raced (autoprune, random) "
             "and the final fine-tune's epochs.", "",
             "| model | budget | method | " + " | ".join(labels) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    for (model, budget, method), part in table.groupby(["model", "budget", "method"], sort=False):
        cells = []
        for t in times:
            row = part[part["time_budget"] == t]
            if not len(row):
                cells.append("")
                continue
            r = row.iloc[0]
            raced = f"{r.trials:.0f} cand., " if r.trials == r.trials and r.trials > 0 else ""
            cells.append(f"{task.show(r.test_mean)} ± {task.show(r.test_std)} ({r.runs}) "
                         f"[{raced}{r.epochs:.1f} ep]")
        lines.append(f"| {model} | {budget:g} | {method} | " + " | ".join(cells) + " |")
    return lines + ["", f"![test {task.name} against wall time]({picture})", ""]


def plot_anytime(table: pd.DataFrame, path: Path, task: Task, order: Sequence[str]) -> None:
    """``anytime.png``: a panel per (model, budget), test accuracy (mean ± std) against the time budget."""
    if table.empty:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(zip(table["model"], table["budget"])))
    scale, unit = (100, ", %") if "%" in task.format else (1, "")
    times = sorted(table["time_budget"].unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    colours = {method: f"C{i % 10}" for i, method in enumerate(dict.fromkeys([*ANYTIME_METHODS, *ON_REQUEST, *order]))}
    for ax, (model, budget) in zip(axes[0], panels):
        part = table[(table["model"] == model) & (table["budget"] == budget)]
        for method, rows in part.groupby("method", sort=False):
            rows = rows.sort_values("time_budget")
            ax.errorbar(rows["time_budget"] / 60, scale * rows["test_mean"], yerr=scale * rows["test_std"],
                        marker="o", capsize=3, label=method, color=colours.get(method))
        ax.set(title=f"{model}, FLOPs {budget:g} of base", xlabel="time budget (scan included)",
               ylabel=f"test {task.name}{unit}")
        if times[-1] >= 4 * times[0]:
            ax.set_xscale("log")
        ax.set_xticks([t / 60 for t in times], [duration_label(t) for t in times])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
