"""Channel importance criteria: how a group's channels are ranked before a plan keeps the top ones.

Each criterion wraps one of Torch-Pruning's group importances. ``register``
adds another, so a new criterion is one call; one that ``needs_gradients``
gets the loss gradients of a few training batches before it scores.

Example:
    >>> from autoprune.prune.importance import CRITERIA
    >>> sorted(CRITERIA)
    ['bn_scale', 'fpgm', 'l1', 'l2', 'taylor', 'thinet']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch_pruning as tp

from autoprune.errors import AutopruneError


@dataclass(frozen=True)
class Criterion:
    """A named importance: ``make`` builds the Torch-Pruning scorer."""

    name: str
    make: Callable[[], tp.importance.Importance]
    description: str
    needs_gradients: bool = False


CRITERIA: dict[str, Criterion] = {}


def register(name: str, make: Callable[[], tp.importance.Importance], description: str,
             needs_gradients: bool = False) -> Criterion:
    """Add a criterion under ``name`` (``--importance name``, ``importance: name`` in a space)."""
    CRITERIA[name] = Criterion(name, make, description, needs_gradients)
    return CRITERIA[name]


register("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1), "L1 norm of the group's weights (default)")
register("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2), "L2 norm of the group's weights")
register("bn_scale", tp.importance.BNScaleImportance,
         "|gamma| of the group's BatchNorm layers (network slimming); groups without BatchNorm use L1")
register("taylor", tp.importance.GroupTaylorImportance,
         "first-order Taylor |w * dL/dw| on a few training batches", needs_gradients=True)
register("fpgm", tp.importance.FPGMImportance,
         "distance to the geometric median of the group's filters (FPGM)")
# ThiNet ranks from activations of the next layer (autoprune.prune.thinet.rerank, which the API calls
# once the groups are found); L1 is its starting point and stays for groups it cannot read.
register("thinet", lambda: tp.importance.GroupMagnitudeImportance(p=1),
         "greedy reconstruction of the next layer's output on a few training batches (ThiNet)")


def criterion(name: str) -> Criterion:
    """The criterion called ``name``; an unknown name is refused with the valid ones."""
    if name not in CRITERIA:
        raise AutopruneError(f"unknown importance {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]
