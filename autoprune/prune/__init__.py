"""Channel pruning: the groups Torch-Pruning finds, plans of channels to keep, and the surgery."""

from autoprune.prune.plan import Plan
from autoprune.prune.groups import ChannelGroups, Group, apply_plan
from autoprune.prune.importance import criterion, register
from autoprune.prune.rounding import round_counts
from autoprune.prune.thinet import rerank

__all__ = ["Plan", "ChannelGroups", "Group", "apply_plan", "criterion", "register", "round_counts", "rerank"]
