import numpy as np
import pandas as pd
import pytest

from autoprune.inputs.task import CLASSIFICATION
from autoprune.cost.budget import Budget, fits, smallest, usage
from autoprune.cost.costmodel import CostModel
from autoprune.counting import Cost
from autoprune.prune.groups import ChannelGroups
from autoprune.study.sensitivity import bounds, curves, equal_drop, ratio_at_drop, scan
from autoprune.train.loop import evaluate, resolve_device

GRID = (0.25, 0.5, 0.75)


@pytest.fixture
def setup(tiny, digits_data):
    device = resolve_device("cpu")
    groups = ChannelGroups(tiny, digits_data.example_input(), base_model="tiny")
    base = evaluate(tiny, digits_data.loader("val"), device, CLASSIFICATION)
    return groups, CostModel(groups), base, device


def test_scan_writes_every_cell_and_reuses_them(setup, tiny, digits_data, tmp_path, monkeypatch):
    groups, costs, base, device = setup
    path = tmp_path / "sensitivity.csv"
    table = scan(groups, costs, tiny, digits_data, base, device, path, GRID, bn_batches=2, quiet=True)
    assert len(table) == len(groups) * len(GRID)
    assert set(table["group"]) == set(groups.ids)
    assert np.allclose(table["drop"], base - table["val_accuracy"])
    on_disk = pd.read_csv(path)
    assert len(on_disk) == len(table)

    # A rerun evaluates nothing again, and a killed scan resumes where it stopped.
    calls = []
    monkeypatch.setattr("autoprune.study.sensitivity.evaluate", lambda *a: calls.append(1) or 0.5)
    again = scan(groups, costs, tiny, digits_data, base, device, path, GRID, bn_batches=2, quiet=True)
    assert calls == [] and len(again) == len(table)
    on_disk.iloc[:-2].to_csv(path, index=False)
    resumed = scan(groups, costs, tiny, digits_data, base, device, path, GRID, bn_batches=2, quiet=True)
    assert len(calls) == 2 and len(resumed) == len(table)


def test_ratio_at_drop_interpolates():
    curve = (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.1, 0.5]))
    assert ratio_at_drop(curve, 0.05) == pytest.approx(0.25)
    assert ratio_at_drop(curve, 0.3) == pytest.approx(0.75)
    assert ratio_at_drop(curve, 0.9) == 1.0


def test_curves_make_drops_non_decreasing():
    table = pd.DataFrame({"group": ["a"] * 3, "ratio": [0.3, 0.1, 0.2], "drop": [0.2, 0.1, 0.05]})
    ratios, drops = curves(table, ["a"])["a"]
    assert list(ratios) == [0, 0.1, 0.2, 0.3] and list(drops) == [0, 0.1, 0.1, 0.2]


def test_a_group_the_scan_did_not_reach_is_taken_as_averagely_sensitive():
    """A scan cut short by a time budget must not leave a group unprunable (a zero curve)."""
    table = pd.DataFrame({"group": ["a", "b"], "ratio": [0.9, 0.9], "drop": [0.1, 0.3]})
    ratios, drops = curves(table, ["a", "b", "c"])["c"]
    assert list(ratios) == [0, 0.9] and drops[-1] == pytest.approx(0.2)
    assert ratio_at_drop((ratios, drops), 0.1) == pytest.approx(0.45)


def synthetic_table(groups, fragile):
    rows = []
    for g in groups:
        for r in GRID:
            rows.append({"group": g.id, "ratio": r, "drop": (0.8 if g.id == fragile else 0.1) * r})
    return pd.DataFrame(rows)


def test_equal_drop_meets_the_budget_and_spares_the_fragile_group(setup):
    groups, costs, _, _ = setup
    fragile = groups.ids[0]
    table = synthetic_table(groups, fragile)
    limits = Budget.parse("flops=0.5").limits(costs.base)
    n = len(groups)
    ratios = equal_drop(table, costs, limits, np.zeros(n), np.full(n, 0.9))
    kept = np.round(costs.channels * (1 - ratios))
    cost = Cost(*costs.predict_vector(kept))
    assert fits(cost, limits) and usage(cost, limits) > 0.9
    assert ratios[0] == min(ratios)


def test_bounds_protect_fragile_groups_only_as_far_as_the_budget_allows(setup):
    groups, costs, _, _ = setup
    table = synthetic_table(groups, groups.ids[0])
    spared = np.array([0.1] + [0.9] * (len(groups) - 1))  # only the fragile group held back
    just_too_tight = 0.9 * smallest(costs, spared).flops / 0.7 / costs.base.flops
    loose_limits = Budget.parse("flops=0.9").limits(costs.base)
    tight_limits = Budget.parse(f"flops={just_too_tight:.4f}").limits(costs.base)
    loose = bounds(table, costs, loose_limits, 0.9)
    tight = bounds(table, costs, tight_limits, 0.9)
    assert loose[0] < loose[1:].min()  # held back while the budget allows
    assert all(loose <= tight) and tight[0] > 0.1  # released as far as the budget needs
    for caps, limits in ((loose, loose_limits), (tight, tight_limits)):
        assert fits(smallest(costs, caps), Cost(limits.flops * 0.7, limits.params))


def test_a_timed_scan_measures_the_groups_that_carry_most_flops_first(setup, tiny, digits_data, tmp_path):
    """Cut short, a scan has the groups that decide the plan: largest ratio first, costly groups first."""
    groups, costs, base, device = setup
    table = scan(groups, costs, tiny, digits_data, base, device, tmp_path / "s.csv", GRID, bn_batches=1,
                 quiet=True, seconds=1e6)
    first = table[table["ratio"] == max(GRID)]["group"].tolist()
    saved = {g.id: costs.base.flops - costs.predict({g.id: g.unit}).flops for g in groups}  # by hand
    assert list(table["group"][:len(first)]) == first  # the coarsest ratio over every group before any other
    assert first == sorted(saved, key=saved.get, reverse=True) and len(set(saved.values())) > 1
