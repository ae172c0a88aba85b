import numpy as np
import pytest
import torch
import torchvision

from autoprune.cost.costmodel import CostModel
from autoprune.counting import count
from autoprune.prune.groups import ChannelGroups


def random_keep(groups, rng):
    return {g.id: max(1, int(g.channels * rng.uniform(0.1, 1.0))) for g in groups}


# vgg11_bn's 4096-wide classifier makes it the slowest by far (test_matrix's large models are slow too).
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_prediction_matches_thop_on_the_pruned_model(name):
    model = torchvision.models.get_model(name, num_classes=10).eval()
    example = torch.zeros(1, 3, 32, 32)
    groups = ChannelGroups(model, example)
    costs = CostModel(groups)
    assert costs.base == count(model, example)
    rng = np.random.default_rng(0)
    for _ in range(3):
        keep = random_keep(groups, rng)
        predicted = costs.predict(keep)
        measured = count(groups.apply(groups.plan(keep)), example)
        assert predicted.flops == pytest.approx(measured.flops, rel=0.005)
        assert predicted.params == pytest.approx(measured.params, rel=0.005)


def test_prediction_is_exact_on_a_small_residual_model(tiny, example):
    groups = ChannelGroups(tiny, example)
    costs = CostModel(groups)
    keep = {g.id: g.channels // 2 + 1 for g in groups}
    measured = count(groups.apply(groups.plan(keep)), example)
    predicted = costs.predict(keep)
    assert (predicted.flops, predicted.params) == (pytest.approx(measured.flops), pytest.approx(measured.params))
    assert costs.predict(groups.full()) == costs.base


def test_prediction_is_arithmetic_only(monkeypatch):
    """Fast by construction: no model, no thop, a few small matrix products (its speed: README)."""
    model = torchvision.models.resnet50(num_classes=10).eval()
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    costs = CostModel(groups)
    keep = random_keep(groups, np.random.default_rng(1))
    expected = costs.predict(keep)

    def forbidden(*args, **kwargs):
        raise AssertionError("predicting a plan ran the model or counted it")

    monkeypatch.setattr(torch.nn.Module, "__call__", forbidden)
    monkeypatch.setattr("autoprune.cost.costmodel.layer_costs", forbidden)
    monkeypatch.setattr("autoprune.counting._profile", forbidden)
    assert costs.predict(keep) == expected
    assert costs.predict_vector(costs.keep_vector(keep)) == (expected.flops, expected.params)
