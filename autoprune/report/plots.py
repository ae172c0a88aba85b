"""A folder of PNG plots and a ``report.md`` that explains a study at a glance.

Plots: the Pareto front (with the budget and the base model), the sensitivity
curve of every group, the channels the chosen trial keeps per group, and the
search's history; and the same as one interactive page, ``report.html``
(:mod:`autoprune.report.html`). Drawn with matplotlib's object API on the Agg canvas, so no
display and no global pyplot state are involved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from autoprune.cost.budget import BudgetRange
from autoprune.counting import human
from autoprune.files import atomic_path, write_text
from autoprune.inputs.task import Score
from autoprune.report.pareto import curve, trials_frame
from autoprune.study.runs import Run
from autoprune.study.trials import best_trial, trial_plan

PLOTS = {"front": "front.png", "sensitivity": "sensitivity.png", "channels": "channels.png",
         "history": "history.png"}


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def plot_front(frame: pd.DataFrame, run: Run, path: Path) -> None:
    """Validation accuracy against FLOPs and against params; front, budget and base marked.

    A range study's panels draw the trade-off curve across the range (shaded),
    with the uniform plan at each target, fine-tuned alike, beside it.
    """
    base, limits, base_acc = run.base_cost(), run.limits(), run.base_val_accuracy()
    ranged = run.budget if isinstance(run.budget, BudgetRange) else None
    panels = [("flops", "FLOPs (thop MACs)", limits.flops, base.flops),
              ("params", "params", limits.params, base.params)]
    if "latency_ms" in frame:  # measured latency, as the trials recorded it
        panels.append(("latency_ms", "latency (ms, measured)", limits.latency, base.latency))
    figure = Figure(figsize=(5 * len(panels), 4))
    for ax, (key, label, cap, full) in zip(figure.subplots(1, len(panels)), panels):
        rest, front = frame[~frame["on_front"]], frame[frame["on_front"]].sort_values(key)
        ax.scatter(rest[key], rest["val_accuracy"], c="tab:gray", alpha=0.6, label="trials")
        # The front is over accuracy, FLOPs and params at once, so its projection is not a curve: dots.
        ax.scatter(front[key], front["val_accuracy"], c="tab:blue", label=f"Pareto front ({run.score.name}, FLOPs, params)")
        for _, point in front.iterrows():
            ax.annotate(str(int(point["trial"])), (point[key], point["val_accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if base_acc is not None and math.isfinite(full):
            ax.scatter([full], [base_acc], marker="*", s=160, c="tab:red", label="base model", zorder=3)
        if ranged:
            line = curve(frame, key)
            ax.plot(line[key], line["val_accuracy"], "-", c="tab:blue", alpha=0.7, label="trade-off curve")
            uniform = frame[frame["uniform"]].sort_values(key)
            ax.plot(uniform[key], uniform["val_accuracy"], "s--", c="tab:green", ms=4,
                    label="uniform pruning (same fine-tune)")
        if ranged and key == ranged.key:
            ax.axvspan(getattr(ranged.low.limits(base), key), cap, color="tab:orange", alpha=0.12,
                       label=f"range {ranged}")
        elif math.isfinite(cap):
            ax.axvline(cap, ls="--", c="tab:orange", label=f"budget ({cap:.3g} ms)" if key == "latency_ms"
                       else f"budget ({human(cap)})")
        ax.set_xscale("log")
        # Ticks in the counts' own units (1.9M, 3 ms), none between decades: 2×10^6-style labels collide.
        ax.xaxis.set_major_formatter(FuncFormatter(
            (lambda v, _: f"{v:g}") if key == "latency_ms" else (lambda v, _: human(v))))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xticks(_ticks(frame[key], full))
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {run.score.name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"{run.name}: {run.score.name} against cost")
    _save(figure, path)


def _ticks(values: pd.Series, full: float) -> list[float]:
    """About five ticks from the cheapest trial to the base, evenly spaced in log, rounded to two digits."""
    known = values[np.isfinite(values)]
    low = float(known.min()) if len(known) else full
    high = full if math.isfinite(full) else float(known.max())
    return [float(f"{v:.2g}") for v in np.geomspace(low, high, 5)] if 0 < low < high else [low]


def plot_sensitivity(table: pd.DataFrame, path: Path, base_accuracy: float | None = None,
                     score: str = "accuracy") -> None:
    """Validation ``score`` per group as it alone is pruned further (from the unpruned model at 0)."""
    figure = Figure(figsize=(8, 5))
    ax = figure.subplots()
    start = [] if base_accuracy is None else [(0.0, base_accuracy)]
    for i, (gid, rows) in enumerate(table.groupby("group", sort=False)):
        points = start + list(zip(rows["ratio"], rows["val_accuracy"]))
        ratios, accuracies = zip(*sorted(points))
        # Ten colours repeat: the line style tells the second ten apart.
        ax.plot(ratios, accuracies, "o" + ("-", "--", ":")[i // 10 % 3], ms=3, label=gid)
    ax.set_xlabel("share of the group's channels removed")
    ax.set_ylabel(f"validation {score} (group pruned alone)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(figure, path)


def plot_channels(plan_keep: dict[str, int], channels: dict[str, int], trial: int, path: Path) -> None:
    """Channels kept per group by one trial, against the base model's."""
    ids = list(channels)
    figure = Figure(figsize=(8, max(3, 0.3 * len(ids) + 1)))
    ax = figure.subplots()
    ax.barh(ids, [channels[g] for g in ids], color="tab:gray", alpha=0.35, label="base")
    ax.barh(ids, [plan_keep[g] for g in ids], color="tab:blue", label=f"trial {trial}")
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend()
    _save(figure, path)


def plot_history(frame: pd.DataFrame, path: Path, score: str = "accuracy") -> None:
    """Each trial's validation ``score`` in the order run, with the best so far."""
    ordered = frame.sort_values("trial")
    figure = Figure(figsize=(8, 4))
    ax = figure.subplots()
    ax.scatter(ordered["trial"], ordered["val_accuracy"], label="after fine-tune")
    ax.scatter(ordered["trial"], ordered["val_accuracy_before_finetune"], marker="x", c="tab:gray",
               label="before fine-tune")
    ax.step(ordered["trial"], ordered["val_accuracy"].cummax(), where="post", c="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {score}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", framealpha=0.6)
    _save(figure, path)


def _markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_report(run: Run, out: str | Path | None = None, trial: int | None = None) -> Path:
    """Write the plots, ``report.html`` and ``report.md`` into ``out`` (default ``RUN_DIR/report``);
    return the path of ``report.md``.

    Example:
        >>> write_report(open_run("resnet18-digits-flops0.25"))
        PosixPath('results/resnet18-digits-flops0.25/report/report.md')
    """
    out = Path(out) if out else run.folder / "report"
    frame = trials_frame(run)
    chosen = best_trial(run.study, trial)
    plan = trial_plan(chosen)
    plot_front(frame, run, out / PLOTS["front"])
    plot_channels(plan.keep, plan.channels, chosen.number, out / PLOTS["channels"])
    plot_history(frame, out / PLOTS["history"], run.score.name)
    plots = ["front", "channels", "history"]
    table = run.sensitivity() if (run.folder / "sensitivity.csv").is_file() else pd.DataFrame()
    if len(table):
        plot_sensitivity(table, out / PLOTS["sensitivity"], run.base_val_accuracy(), run.score.name)
        plots.insert(1, "sensitivity")
    from autoprune.report.html import write_html  # plotly is imported only here

    write_html(run, frame, chosen.number, out / "report.html")
    write_text(out / "report.md", _report_text(run, frame, chosen.number, plots))
    return out / "report.md"


def _report_text(run: Run, frame: pd.DataFrame, trial: int, plots: list[str]) -> str:
    config, base, limits = run.config, run.base_cost(), run.limits()
    row = frame[frame["trial"] == trial].iloc[0]
    base_acc, score = run.base_val_accuracy(), run.score
    caps = ", ".join(f"≤ {human(cap)} {what}" for cap, what in ((limits.flops, "FLOPs (thop MACs)"),
                                                                 (limits.params, "params"))
                     if math.isfinite(cap))
    lines = [f"# Study `{run.name}`", "",
             f"- model `{config.get('model')}` on `{config.get('dataset')}`, budget `{config.get('budget')}` ({caps})",
             f"- base: {human(base.flops)} FLOPs (thop MACs), {human(base.params)} params"
             + (f", validation {score.name} {score.show(base_acc)}" if base_acc is not None else ""),
             f"- trials: {len(frame)} finished, {int(frame['feasible'].sum())} within budget, "
             f"{int(frame['on_front'].sum())} on the Pareto front",
             f"- chosen trial {trial}: validation {score.name} {score.show(row['val_accuracy'])}, "
             f"FLOPs (thop MACs) {human(row['flops'])} ({row['flops_share']:.1%} of base), "
             f"params {human(row['params'])} ({row['params_share']:.1%} of base)"]
    lines += _export_lines([run.folder / f"trial-{trial}" / "summary.json", run.folder / "summary.json"], trial)
    front = frame[frame["on_front"]]
    shown = pd.DataFrame({"trial": front["trial"], f"val {score.name}": front["val_accuracy"].map(score.show),
                          "FLOPs (thop MACs)": front["flops"].map(human),
                          "FLOPs share": front["flops_share"].map("{:.1%}".format),
                          "params": front["params"].map(human),
                          "params share": front["params_share"].map("{:.1%}".format)})
    if "latency_ms" in front:
        shown["latency (ms)"] = front["latency_ms"].map("{:.3g}".format)
    lines += ["", "Interactive: [report.html](report.html) (opens from the file system; hover a point for "
              "its plan).", "", "## Pareto front", "", _markdown(shown), ""]
    captions = {"front": f"{score.name} against cost: every trial, the front, the budget line and the base model",
                "sensitivity": "Sensitivity: each group pruned alone (after BatchNorm recalibration)",
                "channels": f"Channels kept per group by trial {trial}",
                "history": f"Search history: {score.name} per trial and the best so far"}
    for name in plots:
        lines += [f"## {captions[name].split(':')[0]}", "", f"![{captions[name]}]({PLOTS[name]})", ""]
    return "\n".join(lines)


def _export_lines(paths: list[Path], trial: int) -> list[str]:
    """Test accuracy (and CPU latency) of this trial from the first export of it found in ``paths``."""
    for path in paths:
        summary: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if summary.get("trial") == trial and "test_accuracy" in summary:
            break
    else:
        return []
    score = Score.of(summary)
    lines = [f"- exported after {summary.get('final_epochs')} fine-tune epochs: test {score.name} "
             f"{score.show(summary['test_accuracy'])} (base {score.show(summary['base_test_accuracy'])}), `{path}`"]
    for name, times in summary.get("latency_ms", {}).items():
        lines.append(f"- CPU latency {name}: " + ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in times.items())
                     + f" (median of {summary.get('latency_repeats')}, {summary.get('latency_threads')} thread(s))")
    return lines
