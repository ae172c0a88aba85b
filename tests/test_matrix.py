"""The architecture matrix: every supported model is grouped, projected onto 50 % of its FLOPs,
pruned, run, and counted; the predictor must match thop and the projection fill the budget.

Small models run in the default suite; the large torchvision models are marked slow
(CI runs them too: ``pytest -m slow`` alone runs just those).
"""

import numpy as np
import pytest
import torch
import torchvision

import tiny_models
from autoprune.cost.budget import Budget, fits, project, usage
from autoprune.cost.costmodel import CostModel
from autoprune.counting import count
from autoprune.errors import AutopruneError
from autoprune.prune.groups import ChannelGroups
from autoprune.inputs.models import EXTRA_KWARGS
from autoprune.study.space import for_model

FAST = ["resnet18", "mobilenet_v3_small", "squeezenet1_1"]
SLOW = ["mobilenet_v2", "regnet_x_400mf", "efficientnet_b0", "vgg11_bn", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "densenet121", "convnext_tiny",
        "googlenet", "vit_b_16"]
USER = {"mnist_mlp": (1, 28, 28), "Branches": (3, 32, 32), "GroupedDepthwise": (3, 32, 32),
        "Functional": (3, 32, 32), "small_vit": (3, 32, 32), "tiny_resnet": (3, 32, 32)}


def torchvision_model(name: str) -> torch.nn.Module:
    extra = {"image_size": 64} if name.startswith("vit") else EXTRA_KWARGS.get(name, {})
    torch.manual_seed(0)
    return torchvision.models.get_model(name, num_classes=10, **extra).eval()


def check_matrix_model(name: str, model: torch.nn.Module, shape: tuple[int, ...], plans: int = 2,
                       least: float = 0.97) -> None:
    """Groups, a projected ~50 % FLOPs plan, the pruned model's output, thop against the predictor."""
    example = torch.zeros(1, *shape)
    space = for_model(name if name in FAST + SLOW else model)
    groups = ChannelGroups(model, example)
    assert len(groups) > 0
    space.check_groups(groups.ids)
    costs = CostModel(groups)
    assert costs.base == count(model, example)  # thop sees every parameter, attention included
    assert costs.base.params == sum(p.numel() for p in model.parameters())
    limits = Budget.parse("flops=0.5").limits(costs.base)
    low, high = space.ratio_bounds(groups.ids)
    rng = np.random.default_rng(0)
    x = torch.randn(2, *shape)
    for _ in range(plans):
        kept = project(costs, rng.uniform(0, 0.9, len(groups)), limits, low, high, space.round_to)
        plan = groups.plan(dict(zip(groups.ids, kept.astype(int).tolist())))
        assert plan.keep == {gid: k for gid, k in zip(groups.ids, kept.astype(int)) if k < groups[gid].channels}
        predicted = costs.predict(plan.keep)
        assert fits(predicted, limits) and least <= usage(predicted, limits) <= 1.0
        pruned = groups.apply(plan)
        with torch.no_grad():
            assert pruned(x).shape == model(x).shape
        measured = count(pruned, example)
        assert predicted.flops == pytest.approx(measured.flops, rel=0.005)
        assert predicted.params == pytest.approx(measured.params, rel=0.005)


@pytest.mark.parametrize("name", FAST)
def test_torchvision_model(name):
    check_matrix_model(name, torchvision_model(name), (3, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_large_torchvision_model(name):
    check_matrix_model(name, torchvision_model(name), (3, 64, 64), plans=1)


@pytest.mark.parametrize("name", USER)
def test_user_model(name):
    torch.manual_seed(0)
    factory = getattr(tiny_models, name, None)
    model = factory(10) if name[0].islower() else factory(num_classes=10)
    # A toy model of a few narrow groups moves in coarse steps (one channel of a
    # 24-wide group is several % of its FLOPs), so 97 % is not always reachable.
    check_matrix_model(name, model.eval(), USER[name], plans=3, least=0.9)


def test_channel_shuffle_is_refused_up_front_naming_the_layer():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(AutopruneError, match=r"layer stage2\.0 \(InvertedResidual\) .*channel shuffle"):
        ChannelGroups(model, torch.zeros(1, 3, 64, 64))


def test_grouped_conv_keeps_whole_blocks_and_its_groups():
    model = tiny_models.GroupedDepthwise().eval()
    groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
    assert groups["conv1"].unit == 4 and groups["pointwise"].unit == 4  # grouped conv, GroupNorm
    plan = groups.plan({"conv1": 13})  # rounds to whole blocks of 4
    assert plan.keep["conv1"] == 12
    kept = np.array(plan.kept["conv1"]).reshape(4, 3) % 8
    assert (kept == kept[0]).all()  # every block keeps the same positions
    pruned = groups.apply(plan)
    assert pruned.grouped.groups == 4 and pruned.grouped.in_channels == 12


def test_a_group_torch_pruning_cannot_carry_out_is_named(monkeypatch):
    model = tiny_models.tiny_resnet(10).eval()
    real = ChannelGroups._try

    def broken(self, keep):
        return "RuntimeError: boom" if "down.0" in keep else real(self, keep)

    monkeypatch.setattr(ChannelGroups, "_try", broken)
    with pytest.raises(AutopruneError, match=r"group down\.0 .*cannot be pruned: RuntimeError: boom.*ignore"):
        ChannelGroups(model, torch.zeros(1, 3, 32, 32))
