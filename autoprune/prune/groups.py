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
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from autoprune.counting import attention_macs
from autoprune.errors import AutopruneError
from autoprune.inputs.task import cpu_example, cross_entropy, shape_signature, to_device
from autoprune.prune.importance import criterion
from autoprune.prune.plan import Plan
from autoprune.prune.rounding import round_counts

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Group:
    """One prunable group: ``id`` is the root layer's name, ``layers`` every layer whose
    output channels it removes, ``consumers`` every layer whose input channels it removes.

    ``unit`` is the number of channel blocks a grouped convolution, GroupNorm or
    attention layer in the group splits the channels into: every block loses the
    same positions, so a group keeps a multiple of ``unit`` channels.
    """

    id: str
    channels: int
    layers: tuple[str, ...]
    consumers: tuple[str, ...]
    unit: int = 1


@dataclass(frozen=True)
class ChannelMap:
    """How each module's channel counts depend on the groups, for the cost predictor.

    ``inputs[name][gid]`` is how many of module ``name``'s input channels (or
    features) one channel of group ``gid`` accounts for; ``outputs`` likewise for
    output channels. ``sizes[name]`` is the module's (input, output) channel count.
    ``attention[name]`` is an attention layer's MACs split into (projections,
    attention products), which scale differently with its width.
    """

    inputs: dict[str, dict[str, float]]
    outputs: dict[str, dict[str, float]]
    sizes: dict[str, tuple[int, int]]
    attention: dict[str, tuple[float, float]] = field(default_factory=dict)


def _importance(name: str) -> tp.importance.Importance:
    """The Torch-Pruning scorer for criterion ``name`` (the registry is autoprune.prune.importance)."""
    return criterion(name).make()


def _channel_dim(module: nn.Module) -> int:
    from torchvision.models.convnext import LayerNorm2d  # normalises NCHW over dim 1

    if isinstance(module, LayerNorm2d):
        return 1
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)) else 1


def _size(tensor: object, dim: int) -> int:
    return int(tensor.shape[dim]) if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 else 0


def build_graph(
    model: nn.Module, example_input: object
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

    leaves = [(n, m) for n, m in model.named_modules()
              if not list(m.children()) or isinstance(m, nn.MultiheadAttention)]
    handles = [m.register_forward_hook(record(n)) for n, m in leaves]
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=lambda m, x: m(x), verbose=False
            )
    except AutopruneError:
        raise
    except Exception as err:  # Torch-Pruning cannot trace this model
        shuffle = find_channel_shuffle(model, example_input)
        if shuffle:
            raise AutopruneError(shuffle) from None
        raise AutopruneError(
            f"Torch-Pruning could not trace the model ({type(err).__name__}: {err}); "
            "check that the model runs on the data's input shape"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return graph, grad_fns, sizes


class _ChannelSplits(TorchFunctionMode):
    """Records reshapes that split a feature map's channels into (groups, channels per group)."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack, self.found = stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        source = args[0] if args else None
        if (name in ("view", "reshape") and isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)
                and source.dim() >= 3 and out.dim() == source.dim() + 1
                and out.shape[0] == source.shape[0] and out.shape[1] * out.shape[2] == source.shape[1]
                and out.shape[1] > 1 and out.shape[2] > 1 and out.shape[3:] == source.shape[2:]):
            self.found.append((self.stack[-1] if self.stack else "(model)", int(out.shape[1])))
        return out


def find_channel_shuffle(model: nn.Module, example_input: object) -> str | None:
    """A message naming the layer that splits channels into groups (a channel shuffle), if any.

    Torch-Pruning cannot map channel indices through such a reshape and the
    transpose that follows, so a model that does it cannot be pruned here.

    Example:
        >>> find_channel_shuffle(torchvision.models.shufflenet_v2_x0_5(), torch.zeros(1, 3, 64, 64))
        'layer stage2.0 (InvertedResidual) reshapes its channels into 2 groups ...'
    """
    stack: list[str] = []
    handles = []

    def leave(module: nn.Module, inputs: tuple, output: object) -> None:
        stack.pop()  # a hook that returned the name would replace the module's output

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda m, i, n=name: stack.append(n) and None))
            handles.append(module.register_forward_hook(leave))
    mode = _ChannelSplits(stack)
    try:
        with torch.no_grad(), mode:
            model(example_input)
    except Exception:  # the model itself fails: leave the message to the caller
        return None
    finally:
        for handle in handles:
            handle.remove()
    if not mode.found:
        return None
    layer, parts = mode.found[0]
    kind = type(model.get_submodule(layer)).__name__ if layer != "(model)" else type(model).__name__
    return (f"layer {layer} ({kind}) reshapes its channels into {parts} groups and mixes them (a channel "
            "shuffle); Torch-Pruning cannot follow channels through that, so this model cannot be pruned: "
            "use a model without channel shuffle (e.g. mobilenet_v2)")


def _attention_split(model: nn.Module, example_input: object) -> dict[str, tuple[float, float]]:
    """Each attention layer's MACs as (projections, products), from one forward pass."""
    found: dict[str, tuple[float, float]] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not layers:
        return found

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            found.setdefault(name, attention_macs(module, inputs[0], inputs[1]))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _unit(group, names: dict[nn.Module, str]) -> int:
    """How many equal blocks the group's channels fall into (grouped conv, GroupNorm, attention heads)."""
    unit = 1
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
            unit = math.lcm(unit, module.groups)
        elif isinstance(module, nn.GroupNorm):
            unit = math.lcm(unit, module.num_groups)
        elif isinstance(module, nn.MultiheadAttention):
            unit = math.lcm(unit, module.num_heads)
    return unit


def _gradients(model: nn.Module, batches: Iterable, loss: Callable) -> None:
    """Accumulate the task loss's gradients of ``batches`` on ``model`` (for Taylor importance)."""
    model.zero_grad()
    seen = 0
    with torch.enable_grad():
        for batch in batches:
            loss(model, to_device(batch, torch.device("cpu"))).backward()
            seen += 1
    if not seen:
        raise AutopruneError("taylor importance needs training batches; none were given")
    for param in model.parameters():  # unused layers: zero gradient, not a crash
        if param.grad is None:
            param.grad = torch.zeros_like(param)


def _target_name(dep: object, names: dict[object, str], grad_fns: dict[object, str]) -> str | None:
    """The module (or, for a bare parameter such as a class token, the parameter) a dependency prunes."""
    target = dep.target
    if isinstance(target.module, (nn.Module, nn.Parameter)) and target.module in names:
        return names[target.module]
    return grad_fns.get(target.grad_fn)


class ChannelGroups:
    """The prunable channel groups of a model and the surgery that applies a plan.

    Groups are found once on a copy of ``model``; channels are ranked by
    ``importance`` on the base weights, least important first, so a plan of
    channel counts becomes a plan of channel indices deterministically. A
    criterion that needs gradients (``taylor``) takes them from ``batches``,
    an iterable of batches, through ``loss(model, batch)`` (the task's; cross-entropy
    by default). ``example_input`` is what the model is called with: a batched
    tensor or a list of image tensors (a detector's). With ``check`` every group is pruned
    once on a copy at construction, so a model Torch-Pruning mishandles is
    refused here, naming the layer, and not in the middle of a search.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> groups = ChannelGroups(model, torch.zeros(1, 3, 32, 32))
        >>> plan = groups.plan({g.id: g.channels // 2 for g in groups})
        >>> small = groups.apply(plan)
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: object,
        importance: str = "l1",
        ignore: Sequence[str] = (),
        base_model: str = "",
        batches: Iterable | None = None,
        check: bool = True,
        loss: Callable[[nn.Module, object], torch.Tensor] = cross_entropy,
    ) -> None:
        self.model = model
        self.example_input = cpu_example(example_input)
        self.importance = importance
        self.base_model = base_model
        chosen = criterion(importance)
        probe = copy.deepcopy(model).cpu().eval()
        graph, grad_fns, sizes = build_graph(probe, self.example_input)
        with torch.no_grad():
            self.output_shape = shape_signature(probe(self.example_input))
        if chosen.needs_gradients:
            if batches is None:
                raise AutopruneError(f"{importance} importance needs a few training batches "
                                     "(pass batches=); or choose l1, l2, bn_scale or fpgm")
            _gradients(probe, batches, loss)
        names = {m: n for n, m in probe.named_modules()}
        params = {p: n for n, p in probe.named_parameters()}
        scorer, fallback = chosen.make(), _importance("l1")
        self.groups: list[Group] = []
        self.rankings: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        inputs: dict[str, dict[str, float]] = {}
        outputs: dict[str, dict[str, float]] = {}
        # Roots left alone are skipped before their group is built: a detector's head reshapes its
        # channels into anchors × classes, and building those groups takes minutes.
        skip = [m for n, m in probe.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in ignore)]
        for group in graph.get_all_groups(ignored_layers=skip, root_module_types=ROOT_TYPES):
            found = self._describe(group, graph, names, ignore)
            if found is None:
                continue
            self.groups.append(found)
            self.scores[found.id], self.rankings[found.id] = self._rank(group, found, scorer, fallback)
            for dep, idxs in group:
                name = _target_name(dep, {**names, **params}, grad_fns)
                if name is None:
                    continue
                if dep.target.module in params:  # a bare parameter: its pruned dim is the group's
                    sizes[name] = (found.channels, found.channels)
                side = outputs if graph.is_out_channel_pruning_fn(dep.handler) else inputs
                per_group = side.setdefault(name, {})
                per_group[found.id] = max(per_group.get(found.id, 0.0), len(idxs) / found.channels)
        self.channel_map = ChannelMap(inputs, outputs, sizes, _attention_split(probe, self.example_input))
        self._by_id = {g.id: g for g in self.groups}
        if check:
            self.check()

    @staticmethod
    def _rank(group, found: Group, scorer, fallback) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores per position within one channel block, and the positions least important first.

        A criterion that cannot score the group (BatchNorm scale without a
        BatchNorm) falls back to L1; scores are averaged over the blocks.
        """
        with torch.no_grad():
            scores = scorer(group)
            if scores is None or scores.numel() != found.channels:
                scores = fallback(group)
        if scores is None or scores.numel() != found.channels:  # keep the layer order
            scores = torch.arange(found.channels, dtype=torch.float)
        scores = scores.detach().float().cpu().view(found.unit, -1).mean(dim=0)
        return scores, torch.argsort(scores, stable=True)

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
        unit = _unit(group, names)
        if not consumers or channels < 2 * unit or channels % unit:
            return None
        if any(fnmatch.fnmatchcase(layer, pattern) for layer in layers for pattern in ignore):
            return None
        return Group(gid, channels, tuple(dict.fromkeys(layers)), tuple(dict.fromkeys(consumers)), unit)

    def check(self) -> None:
        """Prune every group by one block on a copy and run it; name the group that breaks.

        Torch-Pruning can build groups it cannot carry out (a channel mixing it
        misreads); this refuses such a model before any search starts.
        """
        problem = self._try({g.id: g.channels - g.unit for g in self.groups})
        if problem is None:
            return
        for group in self.groups:
            alone = self._try({group.id: group.channels - group.unit})
            if alone is not None:
                raise AutopruneError(
                    f"group {group.id} (layers {', '.join(group.layers[:4])}"
                    f"{' …' if len(group.layers) > 4 else ''}) cannot be pruned: {alone}; "
                    f"leave it alone with an ignore pattern such as {group.id!r} in the search space")
        raise AutopruneError(f"the model cannot be pruned with all groups at once: {problem}")

    def _try(self, keep: Mapping[str, int]) -> str | None:
        """What goes wrong when ``keep`` is applied and run, or None."""
        try:
            pruned = self.apply(self.plan(keep))
            with torch.no_grad():
                shape = shape_signature(pruned(self.example_input))
        except AutopruneError:
            raise
        except Exception as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if shape != self.output_shape:
            return f"the output shape changes from {self.output_shape} to {shape}"
        return None

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, gid: str) -> Group:
        return self._by_id[gid]

    @property
    def ids(self) -> list[str]:
        return [g.id for g in self.groups]

    def round_keep(self, gid: str, count: float, round_to: int = 1) -> int:
        """The channel count a plan keeps for ``count``: a multiple of the group's unit and, where
        the group is that wide, of ``round_to`` (as ``budget.keep_counts`` rounds)."""
        group = self[gid]
        step = math.lcm(group.unit, round_to)
        step = step if group.channels >= step else group.unit
        return int(round_counts(np.array([float(count)]), np.array([step]), np.array([group.unit]),
                                np.array([group.channels]))[0])

    def plan(self, keep: Mapping[str, int], meta: dict | None = None) -> Plan:
        """Turn channel counts per group into a plan that keeps the most important channels.

        Counts are rounded down to whole blocks (``Group.unit``); every block
        keeps the same, most important positions.
        """
        kept = {}
        for gid, count in keep.items():
            group = self[gid]
            count = self.round_keep(gid, count)
            if count < group.channels:
                block = group.channels // group.unit
                top = self.rankings[gid][block - count // group.unit:].tolist()
                kept[gid] = tuple(sorted(b * block + i for b in range(group.unit) for i in top))
        channels = {gid: self[gid].channels for gid in kept}
        return Plan(kept, channels, self.importance, self.base_model, meta or {})

    def full(self) -> dict[str, int]:
        """The channel count of every group: the plan that prunes nothing."""
        return {g.id: g.channels for g in self.groups}

    def apply(self, plan: Plan) -> nn.Module:
        """A pruned copy of the base model (on the CPU); the base model is untouched."""
        return apply_plan(self.model, plan, self.example_input)


def apply_plan(model: nn.Module, plan: Plan, example_input: object) -> nn.Module:
    """Physically remove the channels ``plan`` drops from a copy of ``model``.

    Example:
        >>> pruned = apply_plan(base, Plan.load("plan.json"), torch.zeros(1, 3, 32, 32))
    """
    pruned = copy.deepcopy(model).cpu().eval()
    if not plan.kept:
        return pruned
    graph, _, _ = build_graph(pruned, cpu_example(example_input))
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
            with warnings.catch_warnings():  # Torch-Pruning's shape inference warns on deep models (detectors)
                warnings.simplefilter("ignore")
                graph.get_pruning_group(root, pruner.prune_out_channels, drop).prune()
    _sync_widths(pruned)
    return pruned


def _sync_widths(model: nn.Module) -> None:
    """Update widths a model keeps as plain attributes and uses in ``forward``.

    torchvision's VisionTransformer reshapes patches with ``self.hidden_dim``;
    Torch-Pruning shrinks the layers but not that number.
    """
    from torchvision.models.vision_transformer import VisionTransformer

    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.hidden_dim = module.conv_proj.out_channels

