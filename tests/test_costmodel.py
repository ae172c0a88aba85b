import time

import numpy as np
import pytest
import torch
import torchvision

from autoprune.costmodel import CostModel
from autoprune.counting import count
from autoprune.groups import ChannelGroups


def random_keep(groups, rng):
    return {g.id: max(1, int(g.channels * rng.uniform(0.1, 1.0))) for g in groups}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11_bn"])
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


def test_prediction_takes_well_under_a_millisecond():
    model = torchvision.models.resnet50(num_classes=10).eval()
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    costs = CostModel(groups)
    keep = costs.keep_vector(random_keep(groups, np.random.default_rng(1)))
    costs.predict_vector(keep)
    start = time.perf_counter()
    for _ in range(200):
        costs.predict_vector(keep)
    assert (time.perf_counter() - start) / 200 < 1e-3
