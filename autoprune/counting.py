"""FLOPs and parameters as thop counts them — the one place thop is called.

thop counts multiply–accumulates (MACs), which is what most papers call FLOPs;
every number autoprune shows is labelled "FLOPs (thop MACs)". thop leaves
``total_ops``/``total_params`` buffers on the modules it profiles, so it only
ever sees a deep copy here.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

with warnings.catch_warnings():  # thop imports distutils, deprecated in 3.11
    warnings.simplefilter("ignore", DeprecationWarning)
    import thop

CustomOps = dict[type, Callable]


@dataclass(frozen=True)
class Cost:
    """FLOPs (thop MACs) and parameters of a model at one input size."""

    flops: float
    params: float

    def __str__(self) -> str:
        return f"{human(self.flops)} FLOPs (thop MACs), {human(self.params)} params"


def human(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _profile(model: nn.Module, example_input: torch.Tensor, custom_ops: CustomOps | None):
    # Wrapped so that a root that is itself a leaf gets its params counted too
    # (thop counts only children's params); layer_costs unwraps it again.
    probe = nn.Sequential(copy.deepcopy(model).cpu().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return thop.profile(
            probe, inputs=(example_input.cpu(),), custom_ops=custom_ops or {}, verbose=False,
            ret_layer_info=True,
        )


def count(model: nn.Module, example_input: torch.Tensor, custom_ops: CustomOps | None = None) -> Cost:
    """thop's FLOPs (MACs) and params of ``model`` for one ``example_input`` batch.

    Example:
        >>> count(nn.Linear(4, 2), torch.zeros(1, 4))
        Cost(flops=8.0, params=10.0)
    """
    flops, params, _ = _profile(model, example_input, custom_ops)
    return Cost(float(flops), float(params))


def layer_costs(
    model: nn.Module, example_input: torch.Tensor, custom_ops: CustomOps | None = None
) -> dict[str, Cost]:
    """thop's count per counted module, keyed by module name (the leaves of its tree)."""
    _, _, tree = _profile(model, example_input, custom_ops)
    leaves: dict[str, Cost] = {}

    def walk(node: dict, prefix: str) -> None:
        for name, (ops, params, children) in node.items():
            path = f"{prefix}{name}"
            if children:
                walk(children, path + ".")
            elif ops or params:
                previous = leaves.get(path, Cost(0.0, 0.0))
                leaves[path] = Cost(previous.flops + ops, previous.params + params)

    ops, params, children = tree["0"]
    if not children:
        return {"": Cost(float(ops), float(params))}
    walk(children, "")
    return leaves
