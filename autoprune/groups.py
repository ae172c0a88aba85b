"""Prunable channel groups and channel surgery, on top of Torch-Pruning's dependency graph.

A *group* is a set of channels that must go together: a convolution's filters,
the BatchNorm after it, the matching input channels of every consumer, and,
across a residual sum or a depthwise convolution, every layer tied to them.
Torch-Pruning's ``DependencyGraph`` finds them; the rest of autoprune speaks
only of groups, named after their root layer.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .errors import AutopruneError
from .plan import Plan

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Group:
    """One prunable group: ``id`` is the root layer's name, ``layers`` every layer whose
    output channels it removes, ``consumers`` every layer whose input channels it removes."""

    id: str
    channels: int
    layers: tuple[str, ...]
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class ChannelMap:
    """How each module's channel counts depend on the groups, for the cost predictor.

    ``inputs[name][gid]`` is how many of module ``name``'s input channels (or
    features) one channel of group ``gid`` accounts for; ``outputs`` likewise for
    output channels. ``sizes[name]`` is the module's (input, output) channel count.
    """

    inputs: dict[str, dict[str, float]]
    outputs: dict[str, dict[str, float]]
    sizes: dict[str, tuple[int, int]]


def _importance(name: str) -> tp.importance.Importance:
    criteria: dict[str, Callable[[], tp.importance.Importance]] = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    }
    if name not in criteria:
        raise AutopruneError(f"unknown importance {name!r}; choose one of {', '.join(criteria)}")
    return criteria[name]()


IMPORTANCES = ("l1", "l2")


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)) else 1


def _size(tensor: object, dim: int) -> int:
    return int(tensor.shape[dim]) if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 else 0


def build_graph(
    model: nn.Module, example_input: torch.Tensor
) -> tuple[tp.DependencyGraph, dict[object, str], dict[str, tuple[int, int]]]:
    """Trace ``model`` (modified in place by later pruning) into a dependency graph.

    Also returns, for modules Torch-Pruning does not wrap (pooling, activations),
    the autograd node of their output so groups can be traced through them, and
    every leaf module's (input, output) channel count.
    """
    grad_fns: dict[object, str] = {}
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            dim = _channel_dim(module)
            sizes.setdefault(name, (_size(inputs[0] if inputs else None, dim), _size(output, dim)))
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                grad_fns[output.grad_fn] = name
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(record(n)) for n, m in leaves]
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False
            )
    except AutopruneError:
        raise
    except Exception as err:  # Torch-Pruning cannot trace this model
        raise AutopruneError(
            f"Torch-Pruning could not trace the model ({type(err).__name__}: {err}); "
            "check that the model runs on the data's input shape"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return graph, grad_fns, sizes


def _target_name(dep: object, names: dict[nn.Module, str], grad_fns: dict[object, str]) -> str | None:
    target = dep.target
    if isinstance(target.module, nn.Module) and target.module in names:
        return names[target.module]
    return grad_fns.get(target.grad_fn)


class ChannelGroups:
    """The prunable channel groups of a model and the surgery that applies a plan.

    Groups are found once on a copy of ``model``; channels are ranked by
    ``importance`` on the base weights, least important first, so a plan of
    channel counts becomes a plan of channel indices deterministically.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
        >>> plan = groups.plan({g.id: g.channels // 2 for g in groups})
        >>> small = groups.apply(plan)
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        importance: str = "l1",
        ignore: Sequence[str] = (),
        base_model: str = "",
    ) -> None:
        self.model = model
        self.example_input = example_input.detach().cpu()[:1]
        self.importance = importance
        self.base_model = base_model
        probe = copy.deepcopy(model).cpu().eval()
        graph, grad_fns, sizes = build_graph(probe, self.example_input)
        names = {m: n for n, m in probe.named_modules()}
        criterion = _importance(importance)
        self.groups: list[Group] = []
        self.rankings: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        inputs: dict[str, dict[str, float]] = {}
        outputs: dict[str, dict[str, float]] = {}
        for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
            found = self._describe(group, graph, names, ignore)
            if found is None:
                continue
            self.groups.append(found)
            with torch.no_grad():
                scores = criterion(group)
            if scores is None:  # the criterion cannot score this group: keep the layer order
                scores = torch.arange(found.channels, dtype=torch.float)
            self.scores[found.id] = scores.detach().cpu().float()
            self.rankings[found.id] = torch.argsort(self.scores[found.id], stable=True)
            for dep, idxs in group:
                name = _target_name(dep, names, grad_fns)
                if name is None:
                    continue
                side = outputs if graph.is_out_channel_pruning_fn(dep.handler) else inputs
                per_group = side.setdefault(name, {})
                per_group[found.id] = max(per_group.get(found.id, 0.0), len(idxs) / found.channels)
        self.channel_map = ChannelMap(inputs, outputs, sizes)
        self._by_id = {g.id: g for g in self.groups}

    @staticmethod
    def _describe(group, graph, names, ignore) -> Group | None:
        root = group[0].dep.target.module
        gid = names[root]
        channels = len(group[0].idxs)
        layers, consumers = [], []
        for dep, _ in group:
            module = dep.target.module
            name = names.get(module) if isinstance(module, nn.Module) else None
            if name is None or next(module.parameters(), None) is None:
                continue
            if graph.is_out_channel_pruning_fn(dep.handler):
                layers.append(name)
            else:
                consumers.append(name)
        # Channels no layer consumes flow straight to the model's output (the
        # classifier): removing them would change what the model predicts.
        if not consumers or channels < 2:
            return None
        if any(fnmatch.fnmatchcase(layer, pattern) for layer in layers for pattern in ignore):
            return None
        return Group(gid, channels, tuple(dict.fromkeys(layers)), tuple(dict.fromkeys(consumers)))

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, gid: str) -> Group:
        return self._by_id[gid]

    @property
    def ids(self) -> list[str]:
        return [g.id for g in self.groups]

    def plan(self, keep: Mapping[str, int], meta: dict | None = None) -> Plan:
        """Turn channel counts per group into a plan that keeps the most important channels."""
        kept = {}
        for gid, count in keep.items():
            group = self[gid]
            count = max(1, min(group.channels, int(count)))
            if count < group.channels:
                kept[gid] = tuple(sorted(self.rankings[gid][group.channels - count:].tolist()))
        channels = {gid: self[gid].channels for gid in kept}
        return Plan(kept, channels, self.importance, self.base_model, meta or {})

    def full(self) -> dict[str, int]:
        """The channel count of every group: the plan that prunes nothing."""
        return {g.id: g.channels for g in self.groups}

    def apply(self, plan: Plan) -> nn.Module:
        """A pruned copy of the base model (on the CPU); the base model is untouched."""
        return apply_plan(self.model, plan, self.example_input)


def apply_plan(model: nn.Module, plan: Plan, example_input: torch.Tensor) -> nn.Module:
    """Physically remove the channels ``plan`` drops from a copy of ``model``.

    Example:
        >>> pruned = apply_plan(base, Plan.load("plan.json"), torch.zeros(1, 3, 32, 32))
    """
    pruned = copy.deepcopy(model).cpu().eval()
    if not plan.kept:
        return pruned
    graph, _, _ = build_graph(pruned, example_input.detach().cpu()[:1])
    modules = dict(pruned.named_modules())
    for gid, kept in plan.kept.items():
        root = modules.get(gid)
        if root is None:
            raise AutopruneError(f"plan names layer {gid!r}, which the model does not have; "
                                 "apply a plan to the base model it was made for")
        pruner = graph.get_pruner_of_module(root)
        channels = pruner.get_out_channels(root)
        if channels != plan.channels[gid]:
            raise AutopruneError(f"plan expects {plan.channels[gid]} channels in {gid!r}, the model "
                                 f"has {channels}; apply a plan to the base model it was made for")
        drop = sorted(set(range(channels)) - set(kept))
        if drop:
            graph.get_pruning_group(root, pruner.prune_out_channels, drop).prune()
    return pruned


def matching_layers(model: nn.Module, patterns: Iterable[str]) -> dict[str, list[str]]:
    """For each name pattern (fnmatch style), the model's layers it matches."""
    names = [n for n, _ in model.named_modules() if n]
    return {p: [n for n in names if fnmatch.fnmatchcase(n, p)] for p in patterns}
