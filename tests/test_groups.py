import pytest
import torch
import torchvision

from autoprune.counting import count
from autoprune.errors import AutopruneError
from autoprune.prune.groups import ChannelGroups, apply_plan
from autoprune.prune.plan import Plan


def test_groups_couple_the_residual_and_leave_the_classifier(tiny, example):
    groups = ChannelGroups(tiny, example)
    by_layer = {layer: g for g in groups for layer in g.layers}
    residual = by_layer["stem.0"]
    assert {"stem.0", "stem.1", "block.conv2", "block.bn2"} <= set(residual.layers)
    assert "block.conv1" in residual.consumers and "down.0" in residual.consumers
    assert "fc" not in by_layer  # the output layer is never pruned
    assert sorted(g.channels for g in groups) == [24, 24, 48]


def test_apply_removes_channels_and_keeps_the_output_shape(tiny, example):
    groups = ChannelGroups(tiny, example)
    plan = groups.plan({g.id: g.channels // 4 for g in groups})
    pruned = groups.apply(plan)
    x = torch.randn(5, 3, 32, 32)
    assert pruned(x).shape == tiny(x).shape == (5, 10)
    assert pruned.stem[0].out_channels == 6 and pruned.block.conv2.out_channels == 6
    assert pruned.fc.in_features == 12
    assert tiny.stem[0].out_channels == 24  # the base model is untouched
    assert count(pruned, example).flops < count(tiny, example).flops / 4


def test_plan_keeps_the_most_important_channels(tiny, example):
    with torch.no_grad():
        tiny.down[0].weight[5] *= 100  # make channel 5 of the strided conv stand out
    groups = ChannelGroups(tiny, example)
    plan = groups.plan({"down.0": 1})
    assert plan.kept["down.0"] == (5,)


def test_plan_round_trips_through_json_and_rebuilds_the_same_model(tiny, example, tmp_path):
    groups = ChannelGroups(tiny, example, base_model="abc")
    plan = groups.plan({g.id: g.channels // 2 for g in groups})
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(apply_plan(tiny, again, example)(x), groups.apply(plan)(x))


def test_plan_for_another_model_is_refused(tiny, example):
    plan = ChannelGroups(tiny, example).plan({"down.0": 4})
    other = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(AutopruneError, match="does not have"):
        apply_plan(other, plan, example)


def test_ignore_patterns_leave_matching_groups_out(tiny, example):
    groups = ChannelGroups(tiny, example, ignore=["down.*"])
    assert all("down.0" not in g.layers for g in groups)


def test_unknown_importance_is_refused(tiny, example):
    with pytest.raises(AutopruneError, match="unknown importance"):
        ChannelGroups(tiny, example, importance="magic")
