"""Time budgets: durations, the successive-halving plan, coarse-to-fine scans, a timed run, and
rounding that never makes a budget unreachable."""

import json
import math
import time

import numpy as np
import pytest
import torch

import autoprune
from autoprune.cost.budget import Budget, fit_plan, keep_counts, project, round_counts
from autoprune.cost.costmodel import CostModel
from autoprune.errors import AutopruneError
from autoprune.prune.groups import ChannelGroups
from autoprune.study import halving
from autoprune.study.halving import (CHECK_EPOCHS, ETA, MIN_RUNG_EPOCHS, RACE_BELOW, SCAN_SHARE, SEARCH_SHARE,
                                     Bracket, bracket_rungs, parse_duration, plan_bracket, races)
from autoprune.study.sensitivity import coarse_to_fine
from autoprune.study.space import load_space
from tiny_models import TinyResNet


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("2.5m", 150),
                                           ("600", 600), (45, 45), ("1h 5s", 3605)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "10x", "0", "-5m", "m"])
def test_bad_durations_are_refused_with_the_forms_that_work(text):
    with pytest.raises(AutopruneError, match="30m|more than 0"):
        parse_duration(text)


def test_the_bracket_fits_the_time_and_halves_by_eta():
    bracket = plan_bracket(seconds=300, epoch_seconds=10, overhead=1.0, most=100)
    n = bracket.candidates
    assert n % ETA == 0 and bracket.rungs == bracket_rungs(n) >= 3
    assert bracket.epochs >= MIN_RUNG_EPOCHS
    spent = bracket.cost() * 10 + 1.0 * (n + bracket.rungs)
    assert spent <= 300 + 1e-6
    # Each rung keeps the best third of the last (rounded up) and trains it three times as long.
    assert [bracket.survivors(k) for k in range(bracket.rungs)] == [math.ceil(n / ETA ** k)
                                                                   for k in range(bracket.rungs)]
    # It is the widest that fits: ETA more candidates at the shortest rung would not.
    wider = Bracket(n + ETA, bracket_rungs(n + ETA), MIN_RUNG_EPOCHS)
    assert wider.cost() * 10 + 1.0 * (wider.candidates + wider.rungs) > 300
    # At a power of ETA it narrows to one and every rung costs the same: n/3 candidates train 3 times as long.
    nine = plan_bracket(seconds=300, epoch_seconds=10, overhead=1.0, most=9)
    assert (nine.candidates, nine.rungs) == (9, 3)
    assert [nine.survivors(k) for k in range(3)] == [9, 3, 1]
    assert {nine.survivors(k) * ETA ** k for k in range(nine.rungs)} == {9}


def _search_seconds(minutes: float) -> float:
    """What timed_search gives plan_bracket under a time budget whose scan takes its whole share."""
    total = 60 * minutes
    return SEARCH_SHARE * (total - SCAN_SHARE * total)


# Speeds from the published 120 s rows (results/benchmarks/bench.csv, one CPU thread): a fine-tune epoch of
# resnet18 at 2 % of its FLOPs takes about 6.4 s, of mobilenet_v2 at 10 % about 21 s; a candidate's cut,
# thop check and two scores about 1.5 s. (minutes, epoch seconds) -> (candidates, rungs, survivors per rung);
# before widths between powers of three: resnet18 3, 9, 9 and mobilenet_v2 2, 3, 9 candidates.
@pytest.mark.parametrize("minutes, epoch, most, shape", [
    (2, 6.4, 12, (3, 2, [3, 1])),  # the 120 s rows: unchanged
    (10, 6.4, 12, (12, 3, [12, 4, 2])),  # was 9 (9, 3, 1)
    (30, 6.4, 12, (12, 3, [12, 4, 2])),  # was 9; capped by --trials (12) ...
    (30, 6.4, 100, (30, 4, [30, 10, 4, 2])),  # ... without the cap, 30 (was 27)
    (2, 21.0, 12, (2, 1, [2])),  # the 120 s rows: unchanged, the seed checked against uniform
    (10, 21.0, 12, (6, 2, [6, 2])),  # was 3 (3, 1)
    (30, 21.0, 12, (12, 3, [12, 4, 2])),  # was 9 (9, 3, 1)
])
def test_the_bracket_grows_with_the_time_budget(minutes, epoch, most, shape):
    bracket = plan_bracket(_search_seconds(minutes), epoch, 1.5, most)
    assert (bracket.candidates, bracket.rungs, [bracket.survivors(k) for k in range(bracket.rungs)]) == shape
    assert bracket.epochs >= (CHECK_EPOCHS if bracket.candidates == 2 else MIN_RUNG_EPOCHS)


def test_the_bracket_respects_the_candidate_cap_and_a_short_budget():
    assert plan_bracket(seconds=10_000, epoch_seconds=1, overhead=0, most=4).candidates == 3
    short = plan_bracket(seconds=1, epoch_seconds=100, overhead=0, most=100)
    assert short == Bracket(1, 1, 0.0)  # too short to race: one candidate, trained in the final fine-tune
    # Too short to rank three, long enough to check the seed against uniform for a tenth of an epoch.
    assert plan_bracket(seconds=30, epoch_seconds=10, overhead=1, most=100) == Bracket(2, 1, CHECK_EPOCHS)
    assert plan_bracket(seconds=30, epoch_seconds=10, overhead=1, most=1) == Bracket(1, 1, 0.0)


def test_the_race_is_the_default_under_ten_minutes_only():
    assert RACE_BELOW == 600.0 and races(120.0) and races(RACE_BELOW - 1.0)
    assert not races(RACE_BELOW) and not races(1800.0)
    assert races(1800.0, race=True) and not races(120.0, race=False)  # --race / --no-race win


def test_without_a_race_the_seed_is_only_checked_against_uniform(tiny_run, tmp_path, monkeypatch):
    """A budget the default does not race (RACE_BELOW lowered to a test's seconds) plans two candidates at
    most, the seed and uniform; ``race=True`` plans up to ``trials``. The summary says which ran."""
    asked, real = [], halving.plan_bracket
    monkeypatch.setattr(halving, "plan_bracket", lambda *args: asked.append(args[3]) or real(*args))
    monkeypatch.setattr(halving, "RACE_BELOW", 4.0)
    for race in (None, True):
        out = tmp_path / f"race-{race}"
        result = autoprune.search(TinyResNet(10), "digits", "flops=0.4", weights=str(tiny_run / "base.pt"),
                                  time_budget="5s", race=race, trials=9, out=out, quiet=True, grid=[0.5])
        assert json.loads((out / "summary.json").read_text())["race"] is bool(race)
        assert result.summary["flops_share"] <= 0.4 + 1e-9
    assert asked == [2, 9]
    with pytest.raises(AutopruneError, match="give --time-budget too"):
        autoprune.search(TinyResNet(10), "digits", "flops=0.4", race=False, out=tmp_path / "refused", quiet=True)
    assert not (tmp_path / "refused").exists()


def test_coarse_to_fine_covers_the_grid_once_largest_first():
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    order = coarse_to_fine(grid)
    assert sorted(order) == grid and order[0] == 0.9
    assert set(order[:3]) == {0.9, 0.1, 0.5}  # any prefix spreads over the grid


def test_rounding_below_one_step_moves_in_whole_blocks():
    kept = round_counts(np.array([1.6, 3.2, 12.0, 20.0]), np.array([8.0, 8, 8, 8]), np.array([1.0, 1, 1, 1]),
                        np.array([16.0, 32, 64, 64]))
    assert kept.tolist() == [2, 4, 16, 16]  # below 8: up to whole channels; above: multiples of 8


def test_rounding_never_makes_a_budget_unreachable_on_a_narrow_user_model():
    """A user's 16-32 channel residual model under the shipped resnet space (round_to 8) reaches 10 %."""
    torch.manual_seed(0)
    model = TinyResNet(10, width=16).eval()
    space = load_space("resnet")
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    costs = CostModel(groups)
    n = len(groups)
    limits = Budget.parse("flops=0.1").limits(costs.base)
    plan, pruned, cost = fit_plan(groups, costs, np.zeros(n), limits, np.zeros(n), np.full(n, space.max_ratio),
                                  space.round_to)
    assert cost.flops <= limits.flops
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert keep_counts(costs, np.full(n, space.max_ratio), space.round_to).min() < 8


@pytest.mark.slow  # a 45 s run by design
def test_a_timed_search_ends_within_its_budget_with_a_model_written(tiny_run, tmp_path):
    budget = 45.0
    started = time.perf_counter()
    result = autoprune.search(TinyResNet(10), "digits", "flops=0.4", weights=str(tiny_run / "base.pt"),
                              time_budget=f"{budget:g}s", out=tmp_path / "timed", quiet=True, grid=[0.25, 0.5, 0.75])
    took = time.perf_counter() - started
    # Generous slack: the planner only measures the machine; a loaded machine runs the fixed steps slower.
    assert took <= budget * 2 + 15, f"a {budget:g} s budget took {took:.0f} s"
    summary = json.loads((tmp_path / "timed" / "summary.json").read_text())
    assert summary["time_budget_seconds"] == budget and summary["final_epochs"] > 0
    assert summary["flops_share"] <= 0.4 + 1e-9
    assert result.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert (tmp_path / "timed" / "model.pt").is_file()


def test_start_candidates_begin_with_the_seed_and_uniform_and_stay_within_bounds():
    """A bracket compares the sensitivity seed, uniform pruning and plans on the line through them."""
    from autoprune.study.halving import start_candidates
    from autoprune.study.trials import Problem

    torch.manual_seed(0)
    model = TinyResNet(10, width=16).eval()
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    costs = CostModel(groups)
    n = len(groups)
    seed = np.linspace(0.1, 0.8, n)
    limits = Budget.parse("flops=0.3").limits(costs.base)
    problem = Problem(model, None, groups, costs, limits, np.full(n, 0.05), np.full(n, 0.85), seed, 0.9,
                      torch.device("cpu"))
    found = start_candidates(problem, 7, seed=0)
    assert len(found) == 7 and len(start_candidates(problem, 2)) == 2
    assert all(((r >= 0.05 - 1e-9) & (r <= 0.85 + 1e-9)).all() for r in found)
    keep = [1.0 - r for r in found]
    # Proportions are what the projection keeps: the first is the seed's, the second uniform.
    assert np.allclose(found[0], seed) and np.ptp(found[1]) < 1e-9
    assert np.allclose(np.log(keep[2]), (np.log(1 - seed) + np.log(keep[1])) / 2)
    plans = {tuple(project(costs, r, limits, problem.low, problem.high)) for r in found}
    assert len(plans) == 7  # seven different plans, not seven spellings of one
