"""FLOPs and parameters as thop counts them — the one place thop is called.

thop counts multiply–accumulates (MACs), which is what most papers call FLOPs;
every number autoprune shows is labelled "FLOPs (thop MACs)". thop leaves
``total_ops``/``total_params`` buffers on the modules it profiles, so it only
ever sees a deep copy here.

thop is blind to two things modern models have, and both are fixed here, the
one place it is called: ``nn.MultiheadAttention`` and torchvision's
``LayerNorm2d`` get counting rules (``DEFAULT_OPS``), and parameters a
module without a thop rule owns itself (ViT's class token and position
embedding, ConvNeXt's layer scale, GroupNorm's affine), which thop never
visits, are added as params (no FLOPs, as thop counts no elementwise ops).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from autoprune.inputs.task import to_device

with warnings.catch_warnings():  # thop imports distutils, deprecated in 3.11
    warnings.simplefilter("ignore", DeprecationWarning)
    import thop
    from thop.profile import register_hooks
    from thop.vision.basic_hooks import count_normalization

CustomOps = dict[type, Callable]


def attention_macs(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> tuple[float, float]:
    """MACs of one attention call: (q/k/v and output projections, the two attention products).

    The projections grow with embed_dim², the products with embed_dim times
    the squared sequence length; the cost predictor scales the two apart.
    """
    if module.batch_first and query.dim() == 3:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    q_len, batch = query.shape[0], query.shape[1] if query.dim() == 3 else 1
    k_len, embed = key.shape[0], module.embed_dim
    projections = batch * (q_len * embed * embed + 2 * k_len * module.kdim * embed + q_len * embed * embed)
    products = batch * 2 * q_len * k_len * embed
    return float(projections), float(products)


def count_attention(module: nn.MultiheadAttention, inputs: tuple, output: object) -> None:
    """thop rule for ``nn.MultiheadAttention`` (thop has none and counts it as zero)."""
    module.total_ops += sum(attention_macs(module, inputs[0], inputs[1]))


def _default_ops() -> CustomOps:
    from torchvision.models.convnext import LayerNorm2d

    return {nn.MultiheadAttention: count_attention, LayerNorm2d: count_normalization}


DEFAULT_OPS = _default_ops()


@dataclass(frozen=True)
class Cost:
    """FLOPs (thop MACs) and parameters of a model at one input size, and its latency in
    milliseconds where it was measured or predicted (``inf``: not; as a cap, uncapped)."""

    flops: float
    params: float
    latency: float = math.inf

    def __str__(self) -> str:
        text = f"{human(self.flops)} FLOPs (thop MACs), {human(self.params)} params"
        return text + (f", {self.latency:.3g} ms" if math.isfinite(self.latency) else "")


def human(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _profile(model: nn.Module, example_input: object, custom_ops: CustomOps | None):
    # Wrapped so that a root that is itself a leaf gets its params counted too
    # (thop counts only children's params); layer_costs unwraps it again.
    probe = nn.Sequential(copy.deepcopy(model).cpu().eval())
    ops = {**DEFAULT_OPS, **(custom_ops or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flops, params, tree = thop.profile(probe, inputs=(to_device(example_input, torch.device("cpu")),), custom_ops=ops,
                                           verbose=False, ret_layer_info=True)
    owned = _unvisited_params(probe[0], ops)
    return flops, params + sum(owned.values()), tree, owned


def _unvisited_params(model: nn.Module, ops: CustomOps) -> dict[str, float]:
    """Parameters thop never counts: held directly by a module that has no counting rule.

    thop counts a module's parameters only through its rule; a module without
    one (a container) is descended into, and what it holds itself is lost.
    """
    rules = {**register_hooks, **ops}
    found: dict[str, float] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if type(module) in rules and not isinstance(module, (nn.Sequential, nn.ModuleList)):
            return
        leaf = not list(module.children())
        for name, param in module.named_parameters(recurse=False):
            key = prefix[:-1] if leaf else f"{prefix}{name}"  # a leaf (GroupNorm) under its own name
            found[key] = found.get(key, 0.0) + float(param.numel())
        for name, child in module.named_children():
            walk(child, f"{prefix}{name}.")

    walk(model, "")
    return found


def count(model: nn.Module, example_input: object, custom_ops: CustomOps | None = None) -> Cost:
    """thop's FLOPs (MACs) and params of ``model`` for one ``example_input`` batch.

    Example:
        >>> count(nn.Linear(4, 2), torch.zeros(1, 4))
        Cost(flops=8.0, params=10.0)
    """
    flops, params, _, _ = _profile(model, example_input, custom_ops)
    return Cost(float(flops), float(params))


def layer_costs(
    model: nn.Module, example_input: object, custom_ops: CustomOps | None = None
) -> dict[str, Cost]:
    """thop's count per counted module, keyed by module name (the leaves of its tree), and each
    parameter thop does not visit, keyed by its own name (``class_token``)."""
    _, _, tree, owned = _profile(model, example_input, custom_ops)
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
    leaves.update({name: Cost(0.0, numel) for name, numel in owned.items()})
    return leaves
