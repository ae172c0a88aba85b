"""ThiNet-style channel selection (Luo et al., 2017): keep the channels the next layer needs.

A group's channels are judged by what they contribute to the output of the
layers that consume them. On a few training batches, the consumer's input is
recorded and, at randomly sampled output positions, each input channel's share
of the output is computed (for a convolution, its patch times its kernel slice).
Removing a set ``T`` of channels changes those outputs by ``Σ_{c∈T} x_c``;
ThiNet greedily removes, one at a time, the channel whose removal adds least to
``‖Σ_{c∈T} x_c‖²``. With the Gram matrix ``G = XᵀX`` each greedy step is O(C),
and the removal order is the ranking (least important first).

Unlike a weight norm, this sees the data: a channel with large weights whose
activations are always zero (a dead ReLU) is the first to go.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from autoprune.inputs.task import CLASSIFICATION, Task
from autoprune.prune.groups import ChannelGroups, Group


def greedy_order(gram: torch.Tensor) -> torch.Tensor:
    """Channels in the order ThiNet removes them, from the Gram matrix of their contributions.

    Example:
        >>> greedy_order(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist()
        [1, 2, 0]
    """
    channels = gram.shape[0]
    cross = torch.zeros(channels, dtype=gram.dtype)  # (Σ_{t∈T} x_t)·x_c for every c
    removed = torch.zeros(channels, dtype=torch.bool)
    order = []
    for _ in range(channels):
        # ‖s + x_c‖² - ‖s‖² = 2 s·x_c + ‖x_c‖²: the growth of the reconstruction error
        growth = (2 * cross + gram.diagonal()).masked_fill(removed, float("inf"))
        chosen = int(torch.argmin(growth))
        order.append(chosen)
        removed[chosen] = True
        cross += gram[:, chosen]
    return torch.tensor(order)


def contributions(module: nn.Module, inputs: torch.Tensor, channels: int, samples: int,
                  generator: torch.Generator) -> torch.Tensor | None:
    """Per input channel, its contribution to ``samples`` random outputs of ``module``: (samples, channels).

    None when the module's inputs do not map onto the group's channels one to one
    (a concatenation, a grouped convolution): such a consumer is left out.
    """
    weight = module.weight.detach().float()
    inputs = inputs.float()
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels == channels:
        patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
        batch, _, positions = patches.shape
        n = torch.randint(batch, (samples,), generator=generator)
        pos = torch.randint(positions, (samples,), generator=generator)
        out = torch.randint(module.out_channels, (samples,), generator=generator)
        picked = patches[n, :, pos].view(samples, channels, -1)
        return (picked * weight[out].view(samples, channels, -1)).sum(-1)
    if isinstance(module, nn.Linear) and module.in_features % channels == 0:
        flat = inputs.reshape(-1, module.in_features)  # flatten keeps each channel's features together
        n = torch.randint(flat.shape[0], (samples,), generator=generator)
        out = torch.randint(module.out_features, (samples,), generator=generator)
        return (flat[n].view(samples, channels, -1) * weight[out].view(samples, channels, -1)).sum(-1)
    return None


@torch.no_grad()
def group_rankings(groups: ChannelGroups, model: nn.Module, loader: DataLoader, device: torch.device,
                   batches: int = 4, samples: int = 4096, seed: int = 0,
                   task: Task = CLASSIFICATION) -> dict[str, torch.Tensor]:
    """ThiNet ranking (least important first) of every group whose consumers it can read.

    Groups with no readable consumer keep the ranking they had.
    """
    modules = dict(model.named_modules())
    consumers = {name for group in groups for name in group.consumers}
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in consumers}
    handles = [modules[name].register_forward_pre_hook(
        lambda m, args, name=name: recorded[name].append(args[0].detach().cpu()))
        for name in consumers if name in modules]
    model.to(device).eval()
    try:
        for batch in islice(iter(loader), batches):
            task.call(model, task.to_device(batch, device))
    finally:
        for handle in handles:
            handle.remove()
    generator = torch.Generator().manual_seed(seed)
    rankings = {}
    for group in groups:
        gram = _gram(group, modules, recorded, samples, generator)
        if gram is not None:
            rankings[group.id] = greedy_order(gram)
    return rankings


def _gram(group: Group, modules: dict[str, nn.Module], recorded: dict[str, list[torch.Tensor]],
          samples: int, generator: torch.Generator) -> torch.Tensor | None:
    """Sum over the group's consumers of the Gram matrix of channel contributions, each consumer
    scaled by its output energy so that a large layer does not drown a small one."""
    total = None
    for name in group.consumers:
        if not recorded.get(name):
            continue
        x = contributions(modules[name], torch.cat(recorded[name]), group.channels, samples, generator)
        if x is None:
            continue
        gram = x.T.double() @ x.double()
        gram /= x.sum(1).double().pow(2).sum().clamp_min(1e-12)
        total = gram if total is None else total + gram
    return total


def rerank(groups: ChannelGroups, model: nn.Module, loader: DataLoader, device: torch.device,
           batches: int = 4, seed: int = 0, task: Task = CLASSIFICATION) -> ChannelGroups:
    """Make ``groups`` choose channels the ThiNet way (in place); plans then record ``thinet``.

    Example:
        >>> groups = rerank(ChannelGroups(model, example), model, train_loader, torch.device("cpu"))
        >>> plan = groups.plan({gid: n // 2 for gid, n in groups.full().items()})
    """
    groups.rankings.update(group_rankings(groups, model, loader, device, batches, seed=seed, task=task))
    groups.importance = "thinet"
    return groups
