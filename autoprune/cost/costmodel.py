"""Predict a plan's FLOPs and params without building the pruned model.

thop's count of each module is a product of its input and output channel
counts (convolutions, linear layers) or proportional to one of them (norms,
pooling, depthwise convolutions). Pruning a group removes channels from every
module it touches in fixed proportions, so each module's channel counts are
affine in the groups' kept counts and the whole prediction is a few small
matrix products. Seeded with thop's per-module count of the base model, it
reproduces thop on the physically pruned model; tests check that it does.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from autoprune.counting import Cost, CustomOps, layer_costs
from autoprune.prune.groups import ChannelGroups


class CostModel:
    """FLOPs (thop MACs) and params of any plan over ``groups``, in microseconds.

    Example:
        >>> costs = CostModel(groups)
        >>> costs.predict({g.id: g.channels // 2 for g in groups})
        Cost(flops=..., params=...)
    """

    def __init__(self, groups: ChannelGroups, custom_ops: CustomOps | None = None) -> None:
        self.ids = groups.ids
        self.channels = np.array([g.channels for g in groups], dtype=np.float64)
        self.units = np.array([g.unit for g in groups], dtype=np.float64)  # keep multiples of these
        base = layer_costs(groups.model, groups.example_input, custom_ops)
        self.base = Cost(sum(c.flops for c in base.values()), sum(c.params for c in base.values()))
        # Bare parameters (a ViT's class token) are costed like channel-wise modules.
        modules = {**dict(groups.model.named_parameters()), **dict(groups.model.named_modules())}
        cmap = groups.channel_map
        column = {gid: i for i, gid in enumerate(self.ids)}
        names = [n for n in base if cmap.inputs.get(n) or cmap.outputs.get(n)]
        self.names = names  # the modules the groups touch, in the order of the rows below
        self.fixed = Cost(self.base.flops - sum(base[n].flops for n in names),
                          self.base.params - sum(base[n].params for n in names))

        def matrix(side: dict[str, dict[str, float]]) -> np.ndarray:
            out = np.zeros((len(names), len(self.ids)))
            for row, name in enumerate(names):
                for gid, share in side.get(name, {}).items():
                    if gid in column:
                        out[row, column[gid]] = share
            return out

        self.m_in, self.m_out = matrix(cmap.inputs), matrix(cmap.outputs)
        self.c_in = np.array([self._size(modules[n], cmap, n)[0] for n in names], dtype=np.float64)
        self.c_out = np.array([self._size(modules[n], cmap, n)[1] for n in names], dtype=np.float64)
        self.bilinear = np.array([self._kind(modules[n]) == "bilinear" for n in names])
        # A channel-wise module (norm, pooling, depthwise conv) has as many input
        # as output channels: take whichever side the groups name.
        # Attention's input and output width are one and the same: pruned together.
        tied = np.array([isinstance(modules[n], nn.MultiheadAttention) for n in names], dtype=bool)
        self.m_in[tied] = self.m_out[tied] = np.maximum(self.m_in[tied], self.m_out[tied])
        one_sided = ~self.bilinear & ~self.m_out.any(axis=1)
        self.m_out[one_sided] = self.m_in[one_sided]
        self.c_out[one_sided] = self.c_in[one_sided]
        flops = np.array([base[n].flops for n in names])
        params = np.array([base[n].params for n in names])
        bias = np.array([self._bias(modules[n]) for n in names], dtype=np.float64)
        scalable = np.array([self._scalable(modules[n], c) for n, c in zip(names, self.c_out)])
        # Attention: projections scale like a linear layer, the attention products
        # (sequence² x width) only with the width.
        products = np.array([cmap.attention.get(n, (0.0, 0.0))[1] for n in names])
        products = np.where(self.bilinear, np.minimum(products, flops), 0.0)
        self.flops0 = flops - products
        self.flops_linear0 = products
        self.weight0 = np.where(self.bilinear, params - bias, scalable)
        self.bias0 = np.where(self.bilinear, bias, 0.0)
        self.params_fixed = float(np.where(self.bilinear, 0.0, params - scalable).sum())

    @staticmethod
    def _size(module: nn.Module, cmap, name: str) -> tuple[float, float]:
        if isinstance(module, nn.MultiheadAttention):
            return module.embed_dim, module.embed_dim
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels, module.out_channels
        if isinstance(module, nn.Linear):
            return module.in_features, module.out_features
        return cmap.sizes.get(name, (1, 1))

    @staticmethod
    def _kind(module: nn.Module) -> str:
        if isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            return "scaled" if depthwise else "bilinear"
        return "bilinear" if isinstance(module, (nn.Linear, nn.MultiheadAttention)) else "scaled"

    @staticmethod
    def _bias(module: nn.Module) -> float:
        if isinstance(module, nn.MultiheadAttention):  # biases grow with the width, weights with its square
            return float(sum(p.numel() for n, p in module.named_parameters() if n.endswith("bias")
                             or n.startswith("bias_")))
        bias = getattr(module, "bias", None)
        return float(bias.numel()) if isinstance(bias, torch.Tensor) else 0.0

    @staticmethod
    def _scalable(module: nn.Module, channels: float) -> float:
        """Parameters of a channel-wise module that shrink with its channels."""
        if isinstance(module, torch.Tensor):  # a bare parameter shrinks along one dim
            return float(module.numel())
        if isinstance(module, nn.modules.conv._ConvNd):  # depthwise: every weight is per channel
            return float(sum(p.numel() for p in module.parameters()))
        return float(sum(p.numel() for p in module.parameters() if p.numel() == channels))

    def keep_vector(self, keep: Mapping[str, int]) -> np.ndarray:
        return np.array([keep.get(gid, c) for gid, c in zip(self.ids, self.channels)], dtype=np.float64)

    def shares(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Share of each module's (``self.names``) input and output channels kept, for channels
        kept per group in ``self.ids`` order."""
        removed = self.channels - keep
        return 1.0 - (self.m_in @ removed) / self.c_in, 1.0 - (self.m_out @ removed) / self.c_out

    def predict_vector(self, keep: np.ndarray) -> tuple[float, float]:
        """(FLOPs, params) for channels kept per group, in ``self.ids`` order."""
        r_in, r_out = self.shares(keep)
        scale = np.where(self.bilinear, r_in * r_out, r_out)
        flops = self.fixed.flops + float(self.flops0 @ scale) + float(self.flops_linear0 @ r_out)
        params = (self.fixed.params + self.params_fixed + float(self.weight0 @ scale)
                  + float(self.bias0 @ r_out))
        return flops, params

    def predict(self, keep: Mapping[str, int]) -> Cost:
        """FLOPs (thop MACs) and params of the model that keeps ``keep[gid]`` channels per group."""
        return Cost(*self.predict_vector(self.keep_vector(keep)))

    def carried_flops(self, gid: str) -> float:
        """FLOPs (thop MACs) that cutting group ``gid`` to its last block of channels removes."""
        unit = int(self.units[self.ids.index(gid)])
        return self.base.flops - self.predict({gid: unit}).flops
