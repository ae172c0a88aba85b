import math

import numpy as np
import pytest
import torchvision
import torch

from autoprune.cost.budget import Budget, check_reachable, fit_plan, fits, project, usage
from autoprune.cost.costmodel import CostModel
from autoprune.counting import Cost, count
from autoprune.errors import AutopruneError
from autoprune.prune.groups import ChannelGroups


@pytest.mark.parametrize("text, flops, params, relative", [
    ("flops=0.3", 0.3, None, True),
    ("flops=30%", 0.3, None, True),
    ("FLOPS = 120M", 120e6, None, False),
    ("params=1.5M", None, 1.5e6, False),
    ("flops=0.25,params=0.5", 0.25, 0.5, True),
    ("params=2000", None, 2000, False),
])
def test_budget_parses(text, flops, params, relative):
    budget = Budget.parse(text)
    assert budget.flops == (pytest.approx(flops) if flops else None)
    assert budget.params == (pytest.approx(params) if params else None)
    assert (budget.flops_relative if flops else budget.params_relative) is relative


@pytest.mark.parametrize("text", ["", "flops", "flops=abc", "latency=3", "flops=0", "flops=150%",
                                  "flops=0.3,flops=0.2", "flops=-1"])
def test_malformed_budget_says_how_to_write_one(text):
    with pytest.raises(AutopruneError, match="flops=|must keep"):
        Budget.parse(text)


def test_limits_relative_and_absolute():
    base = Cost(100e6, 4e6)
    assert Budget.parse("flops=0.25").limits(base) == Cost(25e6, math.inf)
    assert Budget.parse("flops=10M,params=0.5").limits(base) == Cost(10e6, 2e6)
    assert str(Budget.parse("flops=0.25,params=1.5M")) == "flops=0.25,params=1.5M"


@pytest.fixture(scope="module")
def resnet():
    model = torchvision.models.resnet18(num_classes=10).eval()
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    return groups, CostModel(groups)


@pytest.mark.parametrize("text", ["flops=0.25", "flops=0.05", "params=0.2", "flops=0.4,params=0.15"])
def test_projection_fills_97_to_100_percent_of_the_budget(resnet, text):
    groups, costs = resnet
    limits = Budget.parse(text).limits(costs.base)
    n = len(groups)
    rng = np.random.default_rng(0)
    for _ in range(5):
        kept = project(costs, rng.uniform(0, 0.9, n), limits, np.zeros(n), np.full(n, 0.95))
        predicted = Cost(*costs.predict_vector(kept))
        assert fits(predicted, limits)
        assert 0.97 <= usage(predicted, limits) <= 1.0


def test_fit_plan_meets_the_budget_as_thop_counts_it(resnet):
    groups, costs = resnet
    limits = Budget.parse("params=0.1").limits(costs.base)
    n = len(groups)
    rng = np.random.default_rng(3)
    for _ in range(3):
        plan, model, cost = fit_plan(groups, costs, rng.uniform(0, 0.9, n), limits, np.zeros(n), np.full(n, 0.95))
        assert cost == count(model, groups.example_input)
        assert cost.params <= limits.params and usage(cost, limits) >= 0.97


def test_unreachable_budget_names_the_smallest_reachable(resnet):
    groups, costs = resnet
    n = len(groups)
    limits = Budget.parse("flops=0.001").limits(costs.base)
    with pytest.raises(AutopruneError, match=r"smallest reachable .* ask for at least flops=0\.0\d+"):
        check_reachable(costs, limits, np.full(n, 0.9))
