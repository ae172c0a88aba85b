import pytest
import torch
import torchvision

from autoprune.cli import main
from autoprune.errors import AutopruneError
from autoprune.prune.groups import ChannelGroups
from autoprune.study.space import for_model, load_space, shipped


def test_shipped_spaces_load_and_are_picked_by_architecture():
    assert {"default", "resnet", "mobilenet", "vgg", "densenet", "convnext", "regnet"} <= set(shipped())
    assert for_model("resnext50_32x4d").name == "resnet"
    assert for_model("efficientnet_b0").name == "mobilenet"
    assert for_model(torchvision.models.vgg11_bn()).name == "vgg"  # by class name
    assert for_model("my_models.py:net").name == "default"
    assert load_space("resnet").round_to == 8


def test_space_bounds_apply_by_group_pattern(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("max_ratio: 0.8\nbounds:\n  'layer4.*': [0.1, 0.5]\n  conv1: [0.0, 0.3]\n")
    low, high = load_space(path).ratio_bounds(["conv1", "layer4.0.conv1", "layer2.0.conv1"])
    assert list(low) == [0.0, 0.1, 0.0] and list(high) == [0.3, 0.5, 0.8]


@pytest.mark.parametrize("text, message", [
    ("bounds:\n  conv1: [0.2, 1.5]\n", r"bounds for 'conv1' must be \[low, high\]"),
    ("importance: magic\n", r"unknown importance 'magic'; choose one of l1, l2, bn_scale, taylor, fpgm"),
    ("rounding: 8\n", r"unknown key 'rounding'; valid keys are name, .*round_to"),
    ("grid: [0.5, 1.0]\n", "grid must be ratios strictly between 0 and 1"),
    ("round_to: 0\n", "round_to must be a whole number"),
])
def test_bad_space_values_are_refused_on_load(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AutopruneError, match=message):
        load_space(path)


def test_patterns_that_match_nothing_list_what_is_valid(tiny, example, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("ignore: [nosuch.*]\n")
    with pytest.raises(AutopruneError, match=r"ignore pattern 'nosuch\.\*' matches no layer; layers are e\.g\. stem\.0"):
        load_space(path).check_layers(tiny)
    path.write_text("bounds:\n  'layer9.*': [0, 0.5]\n")
    groups = ChannelGroups(tiny, example)
    with pytest.raises(AutopruneError, match=r"matches no group; groups are .*down\.0"):
        load_space(path).check_groups(groups.ids)


def test_groups_command_lists_groups_and_refuses_a_bad_space(tmp_path, capsys):
    assert main(["groups", "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "space resnet" in out and "FLOPs (thop MACs)" in out
    assert any(line.startswith("conv1 ") and "0.00–0.90" in line for line in out.splitlines())
    bad = tmp_path / "bad.yaml"
    bad.write_text("bounds:\n  conv1: [0.5, 0.2]\n")
    assert main(["groups", "--model", "resnet18", "--space", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_importance_criteria_rank_channels(tiny, example):
    with torch.no_grad():
        tiny.stem[1].weight.fill_(0.01)
        tiny.stem[1].weight[7] = 5.0  # network slimming keeps the channel with the largest gamma
    slim = ChannelGroups(tiny, example, importance="bn_scale")
    gid = next(g.id for g in slim if "stem.0" in g.layers)
    assert slim.plan({gid: 1}).kept[gid] == (7,)
    assert len(ChannelGroups(tiny, example, importance="fpgm").plan({gid: 3}).kept[gid]) == 3
    with pytest.raises(AutopruneError, match="taylor importance needs a few training batches"):
        ChannelGroups(tiny, example, importance="taylor")
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    taylor = ChannelGroups(tiny, example, importance="taylor", batches=batches)
    l1 = ChannelGroups(tiny, example, importance="l1")
    assert not torch.equal(taylor.rankings[gid], l1.rankings[gid])  # gradients change the order
