"""ThiNet-style selection: greedy reconstruction of the next layer's output."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune.prune.groups import ChannelGroups
from autoprune.prune.thinet import contributions, greedy_order, rerank


def test_greedy_order_removes_the_channel_that_disturbs_the_output_least():
    assert greedy_order(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist() == [1, 2, 0]
    # Channel 1 nearly cancels channel 0: once 0 is gone, removing 1 too restores the output,
    # so it goes before channel 2 although its own contribution is larger (a norm would say 0, 2, 1).
    x = torch.tensor([[1.0, -1.2, 0.0], [0.0, 0.0, 1.1], [0.0, 0.0, 0.0]])  # rows: samples
    assert greedy_order(x.T @ x).tolist() == [0, 1, 2]


def test_contributions_sum_to_the_convolution_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 4, 8, 8)
    parts = contributions(conv, x, 4, 50, torch.Generator().manual_seed(0))
    outputs = conv(x)
    generator = torch.Generator().manual_seed(0)  # the same samples again
    n, pos, out = (torch.randint(k, (50,), generator=generator) for k in (2, 16, 6))
    torch.testing.assert_close(parts.sum(1), outputs[n, out, pos // 4, pos % 4].detach())


def _model_with_a_dead_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        model[0].weight[0] *= 20  # the largest filter by far ...
        model[3].weight[:, 0] *= 20
        model[1].bias[0] = -1e4  # ... but its ReLU never lets anything through
    return model


def test_thinet_drops_a_dead_channel_that_l1_keeps():
    model = _model_with_a_dead_channel()
    loader = DataLoader(TensorDataset(torch.randn(64, 3, 16, 16), torch.zeros(64, dtype=torch.long)), batch_size=32)
    groups = ChannelGroups(model, torch.zeros(1, 3, 16, 16), importance="l1")
    assert groups.rankings["0"][-1] == 0  # L1 ranks the dead channel most important
    rerank(groups, model, loader, torch.device("cpu"))
    assert groups.rankings["0"][0] == 0 and groups.importance == "thinet"
    plan = groups.plan({"0": 4})
    assert 0 not in plan.kept["0"] and plan.importance == "thinet"
    assert sorted(groups.rankings["3"].tolist()) == list(range(8))  # the linear consumer is read too
