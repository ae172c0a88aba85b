"""The trade-off a study found: validation accuracy against FLOPs and params.

Every trial records its plan, FLOPs (thop MACs), params and accuracy, so the
front is read from the study alone. A trial is feasible when it meets the
budget; it is on the front when no feasible trial is at least as accurate,
at most as costly in FLOPs and in params, and better in one of them.

A range study (``flops=0.05..0.5``) is feasible up to the range's upper end, so
its front is the curve across the range; each row also names its target and
whether it is the uniform reference plan.
"""

from __future__ import annotations

import warnings

import numpy as np
import optuna
import pandas as pd

from autoprune.cost.budget import Budget, BudgetRange
from autoprune.counting import human
from autoprune.errors import AutopruneError
from autoprune.inputs.task import Score
from autoprune.study.runs import Run, quiet_storage

COLUMNS = ["trial", "val_accuracy", "val_accuracy_before_finetune", "flops", "flops_share", "params",
           "params_share", "latency_ms", "latency_predicted_ms", "seconds", "feasible", "on_front"]
# Costs are projected onto the budget in whole channels; a relative slack this small is rounding.
TOLERANCE = 1e-9


def trials_frame(run: Run) -> pd.DataFrame:
    """Every finished trial with its costs, accuracy, feasibility and whether it is on the front."""
    limits = run.limits()
    rows = [{"trial": t.number, "val_accuracy": t.user_attrs.get("val_accuracy", t.value),
             "val_accuracy_before_finetune": t.user_attrs.get("val_accuracy_before_finetune", np.nan),
             "flops": t.user_attrs["flops"], "flops_share": t.user_attrs["flops_share"],
             "params": t.user_attrs["params"], "params_share": t.user_attrs["params_share"],
             "latency_ms": t.user_attrs.get("latency_ms", np.nan),
             "latency_predicted_ms": t.user_attrs.get("latency_predicted_ms", np.nan),
             "seconds": t.user_attrs.get("seconds", np.nan)} for t in run.complete()]
    frame = pd.DataFrame(rows, columns=COLUMNS[:-2])
    if isinstance(run.budget, BudgetRange):  # columns a single budget's tables never had
        attrs = {t.number: t.user_attrs for t in run.complete()}
        frame["target"] = [attrs[n].get("target") for n in frame["trial"]]
        frame["uniform"] = [attrs[n].get("reference") == "uniform" for n in frame["trial"]]
    frame["feasible"] = ((frame["flops"] <= limits.flops * (1 + TOLERANCE))
                         & (frame["params"] <= limits.params * (1 + TOLERANCE)))
    timed = np.isfinite(limits.latency)  # under a latency budget the front is over latency
    if timed:
        frame["feasible"] &= frame["latency_ms"] <= limits.latency * (1 + TOLERANCE)
    costs = [k for k, cap in (("flops", limits.flops), ("params", limits.params)) if np.isfinite(cap)]
    frame["on_front"] = frame["feasible"] & non_dominated(frame, frame["feasible"].to_numpy(),
                                                          ("latency_ms", *costs) if timed else ("flops", "params"))
    unmeasured = [c for c in ("latency_ms", "latency_predicted_ms") if frame[c].isna().all()]
    return frame.drop(columns=unmeasured).sort_values(["on_front", "val_accuracy", "flops"],
                                                      ascending=[False, False, True], ignore_index=True)


def non_dominated(frame: pd.DataFrame, among: np.ndarray | None = None,
                  costs: tuple[str, ...] = ("flops", "params")) -> np.ndarray:
    """Rows no other row (of those in ``among``) dominates: accuracy up, ``costs`` (FLOPs and params) down.

    Example:
        >>> t = pd.DataFrame({"val_accuracy": [0.9, 0.8, 0.95], "flops": [10, 5, 12], "params": [3, 3, 4]})
        >>> non_dominated(t).tolist()
        [True, True, True]
        >>> non_dominated(t.assign(flops=[10, 5, 10], params=[3, 3, 3])).tolist()
        [False, True, True]
    """
    points = np.column_stack([-frame["val_accuracy"].to_numpy(float)]
                             + [frame[c].to_numpy(float) for c in costs])  # all: smaller is better
    among = np.ones(len(points), bool) if among is None else np.asarray(among, bool)
    keep = np.zeros(len(points), bool)
    for i, point in enumerate(points):
        others = points[among]
        keep[i] = not np.any(np.all(others <= point, axis=1) & np.any(others < point, axis=1))
    return keep


def pareto_front(run: Run) -> pd.DataFrame:
    """The non-dominated feasible trials, most accurate first.

    Example:
        >>> front = pareto_front(open_run("resnet18-digits-flops0.25"))
        >>> front[["trial", "val_accuracy", "flops_share", "params_share"]].head(1)
    """
    frame = trials_frame(run)
    front = frame[frame["on_front"]].drop(columns=["feasible", "on_front"])
    if isinstance(run.budget, BudgetRange):  # read along the range, cheapest first
        front = front.sort_values([f"{run.budget.key}", "val_accuracy"], ascending=[True, False])
    return front.reset_index(drop=True)


def best_under(run: Run, at: str) -> int:
    """The number of the most accurate finished trial at or under ``at`` (``flops=0.2``, ``params=1M``).

    Shares are of the base model, as in a budget; FLOPs are thop MACs.

    Example:
        >>> best_under(open_run("resnet18-digits-flops0.05..0.5"), "flops=0.2")
        17
    """
    caps = Budget.parse(at).limits(run.base_cost())
    frame = trials_frame(run)
    fit = (frame["flops"] <= caps.flops * (1 + TOLERANCE)) & (frame["params"] <= caps.params * (1 + TOLERANCE))
    under = frame[fit]
    if under.empty:
        least = frame.sort_values("flops").iloc[0]
        raise AutopruneError(f"study {run.name!r} has no finished trial at or under {at}; its smallest has "
                             f"{human(least['flops'])} FLOPs (thop MACs, {least['flops_share']:.1%} of base) and "
                             f"{human(least['params'])} params ({least['params_share']:.1%}): ask for at least that")
    return int(under.sort_values(["val_accuracy", "flops"], ascending=[False, True])["trial"].iloc[0])


def to_text(front: pd.DataFrame, score: Score = Score()) -> str:
    """The front as an aligned table, the study's ``score`` named, costs absolute and as a share of the base."""
    shown = pd.DataFrame({
        "trial": front["trial"],
        f"val {score.name}": front["val_accuracy"].map(score.show),
        "before fine-tune": front["val_accuracy_before_finetune"].map(score.show),
        "FLOPs (thop MACs)": front["flops"].map(human),
        "FLOPs share": front["flops_share"].map("{:.1%}".format),
        "params": front["params"].map(human),
        "params share": front["params_share"].map("{:.1%}".format),
    })
    if "target" in front:
        shown["target"] = [f"{t} (uniform)" if u else t for t, u in zip(front["target"], front["uniform"])]
    if "latency_ms" in front:
        shown["latency ms"] = front["latency_ms"].map("{:.3g}".format)
    return shown.to_string(index=False)


FRONT_SUFFIX = "-front"


def save_front_study(run: Run) -> optuna.Study:
    """Copy the finished trials into a three-objective study ``NAME-front`` in the same storage.

    The search itself is single-objective (the budget is a constraint, and
    Optuna's pruners need one objective), so ``optuna best-trials`` on it shows
    the single best trial. On the copy, with objectives val_accuracy (max),
    flops and params (min) and the budget as a constraint, Optuna's own tools
    (``optuna best-trials --study-name NAME-front``, the dashboard, its plots)
    show the same front as :func:`pareto_front`. The copy is rebuilt each time.

    Example:
        >>> save_front_study(open_run("resnet18-digits-flops0.25")).study_name
        'resnet18-digits-flops0.25-front'
    """
    name, storage = run.name + FRONT_SUFFIX, quiet_storage(run.storage)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    front = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        front.set_metric_names(["val_accuracy", "flops", "params"])
    front.set_user_attr("front_of", run.name)
    limits = run.limits()
    trials = []
    for trial in sorted(run.complete(), key=lambda t: t.number):
        attrs = trial.user_attrs
        over = max(attrs["flops"] / limits.flops, attrs["params"] / limits.params) - 1.0
        trials.append(optuna.trial.create_trial(
            values=[attrs.get("val_accuracy", trial.value), attrs["flops"], attrs["params"]],
            params=trial.params, distributions=trial.distributions,
            user_attrs={"search_trial": trial.number, **{k: v for k, v in attrs.items() if k != "plan"}},
            # Optuna reads a trial's feasibility from this system attribute (<= 0: feasible).
            system_attrs={"constraints": [over if over > TOLERANCE else min(over, 0.0)]}))
    front.add_trials(trials)
    return front


def curve(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """The feasible trials no other beats on accuracy and ``key`` alone, cheapest first: the trade-off curve."""
    feasible = frame[frame["feasible"]]
    return feasible[non_dominated(feasible, costs=(key,))].sort_values(key)
