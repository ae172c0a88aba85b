"""Soft filter pruning (He et al., 2018) as a fine-tune mode.

Instead of cutting a plan's channels at once, the full model is fine-tuned for a
few epochs while, at the start of every epoch, each group's weakest channels (by
L2 norm over every layer that produces them) are set to zero. Zeroed filters keep
receiving gradients, so a channel that turns out to matter can grow back and
another takes its place. At the end the channels with the largest norms are kept
and the rest removed for good: the plan that comes out keeps the same number of
channels per group as the one that went in, but not necessarily the same ones.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader

from autoprune.inputs.task import CLASSIFICATION, Task
from autoprune.options import FINETUNE_LR
from autoprune.prune.groups import ChannelGroups, Group
from autoprune.prune.plan import Plan
from autoprune.train.distill import Distill
from autoprune.train.loop import train


def _slices(model: nn.Module, group: Group) -> list[torch.Tensor]:
    """The parameters whose first dimension is the group's channels (filters, biases, BN affine)."""
    modules = dict(model.named_modules())
    found = []
    for name in group.layers:
        module = modules.get(name)
        if module is None or isinstance(module, nn.ConvTranspose2d):
            continue
        for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if isinstance(param, torch.Tensor) and param.dim() > 0 and param.shape[0] == group.channels:
                found.append(param)
    return found


def channel_norms(model: nn.Module, group: Group) -> torch.Tensor:
    """L2 norm of each of the group's channels over all the layers that produce it."""
    total = torch.zeros(group.channels)
    for param in _slices(model, group):
        total += param.detach().float().pow(2).flatten(1).sum(1).cpu() if param.dim() > 1 \
            else param.detach().float().pow(2).cpu()
    return total.sqrt()


@torch.no_grad()
def zero_weakest(model: nn.Module, groups: ChannelGroups, keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """Zero all but the ``keep[gid]`` strongest channels of each group; returns the zeroed indices."""
    zeroed = {}
    for gid, count in keep.items():
        group = groups[gid]
        drop = torch.argsort(channel_norms(model, group), stable=True)[: group.channels - count]
        for param in _slices(model, group):
            param[drop.to(param.device)] = 0
        zeroed[gid] = drop
    return zeroed


class _EveryEpoch:
    """``train``'s after-step hook that re-selects and zeroes the weakest channels once per epoch."""

    def __init__(self, groups: ChannelGroups, keep: dict[str, int], steps_per_epoch: int) -> None:
        self.groups, self.keep, self.every, self.steps = groups, keep, max(1, steps_per_epoch), 0

    def __call__(self, model: nn.Module) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            zero_weakest(model, self.groups, self.keep)


def soft_prune(base: nn.Module, groups: ChannelGroups, plan: Plan, loader: DataLoader, epochs: float,
               device: torch.device, lr: float = FINETUNE_LR, quiet: bool = False,
               distill: Distill | None = None, task: Task = CLASSIFICATION) -> tuple[nn.Module, Plan]:
    """Soft-prune a copy of ``base`` for ``epochs`` with ``plan``'s channel counts.

    Returns the trained full-size copy and the final plan (the strongest channels
    at the end); ``apply_plan(copy, final_plan, example)`` removes the rest.

    Example:
        >>> trained, final = soft_prune(base, groups, plan, loader, 3, torch.device("cpu"))
        >>> pruned = apply_plan(trained, final, groups.example_input)
    """
    keep = plan.keep
    model = copy.deepcopy(base).to(device)
    zero_weakest(model, groups, keep)
    train(model, loader, epochs, device, lr=lr, desc="soft pruning", quiet=quiet, distill=distill,
          after_step=_EveryEpoch(groups, keep, len(loader)), task=task)
    kept = {gid: tuple(sorted(torch.argsort(channel_norms(model, groups[gid]), stable=True)
                              [groups[gid].channels - count:].tolist()))
            for gid, count in keep.items()}
    meta = {**plan.meta, "soft_epochs": epochs, "selected_by": plan.importance}
    return model.eval(), Plan(kept, dict(plan.channels), "soft-l2", plan.base_model, meta)
