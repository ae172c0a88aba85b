"""Budget ranges: one study whose front spans flops=LOW..HIGH, read back by pareto, report and export."""

import json
import re

import numpy as np
import optuna
import pytest
import torch

import autoprune
from autoprune.cost.budget import STRATA, BudgetRange, parse_budget
from autoprune.cli import main
from autoprune.counting import count
from autoprune.report.pareto import pareto_front, trials_frame
from autoprune.study.runs import open_run
from autoprune.study.trials import COMPLETE, ReachedMedianPruner, choose_stratum
from conftest import RANGE_STUDY

LOW, HIGH = 0.15, 0.6


def _where(run_dir):
    return ["--study", RANGE_STUDY, "--run-dir", str(run_dir)]


def test_a_range_parses_into_log_spaced_targets_with_exact_ends():
    targets = BudgetRange.parse("flops=0.05..0.5").targets()
    shares = np.array([t.flops for t in targets])
    assert len(targets) == STRATA >= 6 and shares[0] == 0.05 and shares[-1] == 0.5
    assert np.allclose(np.diff(np.log(shares)), np.log(10) / (STRATA - 1), rtol=0.01)  # even in log FLOPs
    assert [str(t) for t in parse_budget("params=1M..4M").targets(3)] == ["params=1M", "params=2M", "params=4M"]
    assert str(parse_budget("flops=0.05..0.5")) == "flops=0.05..0.5"
    for bad in ("flops=0.5..0.1", "flops=0.1..20M", "flops=0.1..0.5,params=1M", "flops=0.1..", "flops=0.1..2"):
        with pytest.raises(autoprune.AutopruneError):
            parse_budget(bad)


def _add(study, stratum, value, state=COMPLETE, steps=None):
    study.add_trial(optuna.trial.create_trial(state=state, value=value if state == COMPLETE else None,
                                              intermediate_values=steps or {}, user_attrs={"stratum": stratum}))


def test_new_trials_go_where_the_front_is_thinnest():
    study = optuna.create_study(direction="maximize")
    assert [choose_stratum(study, 3)] == [0]
    for stratum, value in ((0, 0.5), (0, 0.6), (1, 0.7), (2, 0.8), (2, 0.9)):
        _add(study, stratum, value)
    _add(study, 1, None, state=optuna.trial.TrialState.PRUNED, steps={0: 0.1})  # adds no point to the front
    assert choose_stratum(study, 3) == 1  # one finished trial, against two in the others


def test_the_pruner_compares_a_trial_with_its_own_stratum_only():
    study = optuna.create_study(direction="maximize")
    for value in (0.9, 0.92, 0.94):  # a looser target: far more accurate
        _add(study, 1, value, steps={1: value})
    for value in (0.5, 0.55, 0.6):
        _add(study, 0, value, steps={1: value})
    pruner = ReachedMedianPruner(startup=3)

    def verdict(stratum, value, **attrs):
        trial = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, intermediate_values={1: value},
                                          user_attrs={"stratum": stratum, **attrs})
        return pruner.prune(study, trial)

    assert not verdict(0, 0.58)  # above its own stratum's median, below the study's
    assert verdict(0, 0.52)
    assert verdict(1, 0.91) and not verdict(1, 0.91, reference="uniform")  # a reference point is never cut


def test_the_front_spans_the_range_and_every_trial_meets_its_target(tiny_range_run):
    run = open_run(RANGE_STUDY, run_dir=tiny_range_run)
    base = run.base_cost()
    targets = [t.flops for t in BudgetRange.parse(f"flops={LOW}..{HIGH}").targets()]
    assert run.study.user_attrs["config"]["strata"] == STRATA
    trials = run.complete()
    for trial in trials:  # projected onto its own target, as thop counted the built model
        target = targets[trial.user_attrs["stratum"]]
        assert trial.user_attrs["target"] == f"flops={target:g}"
        assert 0.9 * target <= trial.user_attrs["flops"] / base.flops <= target
    uniform = {t.user_attrs["stratum"] for t in trials if t.user_attrs.get("reference") == "uniform"}
    seeds = {t.user_attrs["stratum"] for t in trials if not t.user_attrs.get("reference")}
    assert uniform == seeds == set(range(STRATA))  # the seed and the uniform plan at every target
    front = pareto_front(run)
    assert len(front) >= 6 and front["flops"].is_monotonic_increasing  # read along the range
    assert front["flops_share"].min() <= LOW and front["flops_share"].max() >= 0.9 * HIGH
    assert front["target"].nunique() >= 4  # spread over the range, not bunched at one end


def test_pareto_lists_the_range_with_targets(tiny_range_run, capsys):
    assert main(["pareto", *_where(tiny_range_run)]) == 0
    out = capsys.readouterr().out
    assert f"budget flops={LOW}..{HIGH}" in out and "target" in out and "(uniform)" in out


def test_export_at_a_flops_share_picks_the_best_trial_at_or_under_it(tiny_range_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", *_where(tiny_range_run), "--flops", "0.3", "--out", str(out), "--final-epochs", "0.2",
                 "--repeats", "2", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    frame = trials_frame(open_run(RANGE_STUDY, run_dir=tiny_range_run))
    under = frame[frame["flops_share"] <= 0.3]
    assert summary["trial"] == under.sort_values("val_accuracy", ascending=False)["trial"].iloc[0]
    model = torch.load(out / "model.pt", weights_only=False)
    assert count(model, torch.zeros(1, 3, 32, 32)).flops == summary["flops"] <= 0.3 * summary["base_flops"]


def test_report_draws_the_range_and_writes_a_self_contained_page(tiny_range_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", *_where(tiny_range_run), "--out", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert re.search(r"<script[^>]*\bsrc=", page) is None  # plotly.js inline: no network, no server needed
    for div in ('id="front"', 'id="sensitivity"', 'id="channels"'):
        assert div in page
    assert "uniform pruning (same fine-tune)" in page and "FLOPs (thop MACs)" in page
    assert (out / "front.png").stat().st_size > 5000 and "report.html" in (out / "report.md").read_text()

