"""Soft filter pruning: weakest channels zeroed and re-selected each epoch, then cut for good."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprune.prune.groups import ChannelGroups, apply_plan
from autoprune.train.soft import channel_norms, soft_prune, zero_weakest


def test_zero_weakest_zeros_the_lowest_l2_channels_in_every_producing_layer(tiny, example):
    groups = ChannelGroups(tiny, example)
    with torch.no_grad():
        tiny.down[0].weight[[3, 7]] *= 1e-3
    zeroed = zero_weakest(tiny, groups, {"down.0": 46})
    assert sorted(zeroed["down.0"].tolist()) == [3, 7]
    assert torch.all(tiny.down[0].weight[[3, 7]] == 0) and torch.all(tiny.down[1].weight[[3, 7]] == 0)
    assert torch.all(tiny.down[1].bias[[3, 7]] == 0)
    assert channel_norms(tiny, groups["down.0"])[[3, 7]].sum() == 0


def test_soft_pruning_keeps_the_counts_and_makes_the_cut_lossless(tiny, example):
    groups = ChannelGroups(tiny, example)
    plan = groups.plan({g.id: g.channels // 2 for g in groups})
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))), batch_size=16)
    trained, final = soft_prune(tiny, groups, plan, loader, 2, torch.device("cpu"), lr=0.05, quiet=True)
    assert final.keep == plan.keep and final.importance == "soft-l2" and final.meta["soft_epochs"] == 2
    # The last epoch ends with the weakest channels zeroed, so removing them changes nothing.
    pruned = apply_plan(trained, final, example)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), trained(x), atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny.parameters())
