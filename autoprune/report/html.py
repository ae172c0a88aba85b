"""One self-contained interactive page (plotly) for a study: ``report.html``.

The front, with hover giving each trial's plan, FLOPs (thop MACs), params,
CPU latency where an export measured it, and accuracy; the sensitivity curves;
the channels the chosen trial keeps per group. plotly.js is embedded inline,
so the page opens from the file system with no server and no network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from autoprune.counting import human
from autoprune.files import write_text
from autoprune.inputs.task import Score
from autoprune.prune.plan import Plan
from autoprune.report.pareto import curve
from autoprune.study.runs import Run

FIGURES = ("front", "sensitivity", "channels")  # the page's div ids, in order


def _latency(run: Run, trial: int) -> float | None:
    """Batch-1 CPU latency (ms) of ``trial``'s pruned model, if an export of it measured one."""
    for path in (run.folder / f"trial-{trial}" / "summary.json", run.folder / "summary.json"):
        summary = json.loads(path.read_text()) if path.is_file() else {}
        if summary.get("trial") == trial and "latency_ms" in summary:
            return summary["latency_ms"]["pruned"].get("1")
    return None


def _hover(run: Run, frame: pd.DataFrame) -> list[str]:
    """Per trial: number, target, accuracy, costs, latency and the plan (channels kept per group)."""
    plans = {t.number: Plan.from_dict(t.user_attrs["plan"]) for t in run.complete()}
    texts = []
    for row in frame.itertuples(index=False):
        plan, latency = plans[row.trial], _latency(run, row.trial)
        lines = [f"<b>trial {row.trial}</b>" + (f" (target {row.target})" if "target" in frame else ""),
                 f"val {run.score.name} {run.score.show(row.val_accuracy)}",
                 f"FLOPs (thop MACs) {human(row.flops)} ({row.flops_share:.1%} of base)",
                 f"params {human(row.params)} ({row.params_share:.1%} of base)"]
        if "latency_ms" in frame and row.latency_ms == row.latency_ms:  # timed by the trial itself
            lines.append(f"latency {row.latency_ms:.3g} ms (measured in the search)")
        elif latency is not None:
            lines.append(f"CPU latency, batch 1: {latency:.2f} ms")
        lines += [f"{html.escape(g)}: {plan.keep[g]}/{plan.channels[g]}" for g in plan.channels]
        texts.append("<br>".join(lines))
    return texts


def front_figure(run: Run, frame: pd.DataFrame) -> go.Figure:
    """Accuracy against FLOPs: other trials, the front, the trade-off curve, uniform pruning, the base."""
    frame = frame.assign(hover=_hover(run, frame))
    figure = go.Figure()

    def points(rows: pd.DataFrame, name: str, **style) -> None:
        figure.add_trace(go.Scatter(x=rows["flops"], y=rows["val_accuracy"], name=name, text=rows["hover"],
                                    hovertemplate="%{text}<extra></extra>", **style))

    points(frame[~frame["on_front"]], "other trials", mode="markers", marker=dict(color="gray", opacity=0.6))
    points(frame[frame["on_front"]], "Pareto front (acc, FLOPs, params)", mode="markers",
           marker=dict(color="#1f77b4", size=9))
    line = curve(frame, "flops")
    figure.add_trace(go.Scatter(x=line["flops"], y=line["val_accuracy"], mode="lines", name="trade-off curve",
                                hoverinfo="skip", line=dict(color="#1f77b4")))
    if "uniform" in frame:
        points(frame[frame["uniform"]].sort_values("flops"), "uniform pruning (same fine-tune)",
               mode="lines+markers", marker=dict(color="#2ca02c", symbol="square"), line=dict(dash="dash"))
    base_acc = run.base_val_accuracy()
    if base_acc is not None:
        figure.add_trace(go.Scatter(x=[run.base_cost().flops], y=[base_acc], mode="markers", name="base model",
                                    marker=dict(symbol="star", size=14, color="#d62728")))
    figure.update_layout(title=f"{run.name}: {run.score.name} against FLOPs (budget {run.config.get('budget')})",
                         xaxis=dict(title="FLOPs (thop MACs)", type="log"),
                         yaxis=_score_axis(run.score), hovermode="closest")
    return figure


def _score_axis(score: Score) -> dict:
    """A y axis titled by the score, in percent where the score prints as one."""
    return dict(title=f"validation {score.name}", **({"tickformat": ".0%"} if "%" in score.format else {}))


def sensitivity_figure(table: pd.DataFrame, base_accuracy: float | None, score: Score = Score()) -> go.Figure:
    """Validation ``score`` per group as it alone is pruned further."""
    figure = go.Figure()
    for gid, rows in table.groupby("group", sort=False):
        points = sorted(([(0.0, base_accuracy)] if base_accuracy is not None else [])
                        + list(zip(rows["ratio"], rows["val_accuracy"])))
        figure.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                    name=gid))
    figure.update_layout(title="Sensitivity: each group pruned alone (BatchNorm recalibrated)",
                         xaxis=dict(title="share of the group's channels removed"),
                         yaxis=_score_axis(score))
    return figure


def channels_figure(plan: Plan, trial: int) -> go.Figure:
    """Channels kept per group by trial ``trial``, against the base model's."""
    ids = list(plan.channels)
    figure = go.Figure([go.Bar(y=ids, x=[plan.channels[g] for g in ids], orientation="h", name="base",
                               marker=dict(color="lightgray")),
                        go.Bar(y=ids, x=[plan.keep[g] for g in ids], orientation="h", name=f"trial {trial}",
                               marker=dict(color="#1f77b4"))])
    figure.update_layout(title=f"Channels kept per group by trial {trial}", barmode="overlay",
                         xaxis=dict(title="channels"), yaxis=dict(autorange="reversed"),
                         height=max(350, 22 * len(ids) + 150))
    return figure


def write_html(run: Run, frame: pd.DataFrame, chosen: int, path: Path) -> Path:
    """Write the interactive page to ``path``: plotly.js inline, one figure per :data:`FIGURES` id.

    Example:
        >>> write_html(run, trials_frame(run), run.study.best_trial.number, Path("report.html"))
        PosixPath('report.html')
    """
    plan = Plan.from_dict(next(t for t in run.complete() if t.number == chosen).user_attrs["plan"])
    table = run.sensitivity() if (run.folder / "sensitivity.csv").is_file() else pd.DataFrame()
    figures = {"front": front_figure(run, frame), "channels": channels_figure(plan, chosen)}
    if len(table):
        figures["sensitivity"] = sensitivity_figure(table, run.base_val_accuracy(), run.score)
    body = "\n".join(figures[name].to_html(full_html=False, include_plotlyjs=False, div_id=name)
                     for name in FIGURES if name in figures)
    title = html.escape(f"autoprune study {run.name}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n"
            f"<body><h1>{title}</h1>\n{body}\n</body></html>\n")
    write_text(path, page)
    return path
