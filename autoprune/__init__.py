"""autoprune: budgeted, sensitivity-guided structured pruning with Optuna.

Example:
    >>> import autoprune
    >>> result = autoprune.search("resnet18", "digits", budget="flops=0.25", trials=12)
    >>> model = autoprune.load_pruned(result.out)
"""

from .api import Result, load_pruned, search
from .budget import Budget
from .counting import Cost, count
from .data import Data, load_data
from .errors import AutopruneError
from .groups import ChannelGroups, apply_plan
from .plan import Plan

__all__ = ["search", "load_pruned", "Result", "Budget", "Cost", "count", "Data", "load_data",
           "AutopruneError", "ChannelGroups", "apply_plan", "Plan"]
__version__ = "0.1.0"
