"""autoprune: budgeted, sensitivity-guided structured pruning with Optuna.

Example:
    >>> import autoprune
    >>> result = autoprune.search("resnet18", "digits", budget="flops=0.25", trials=12)
    >>> model = autoprune.load_pruned(result.out)
"""

from .api import Result, export_trial, load_pruned, search
from .budget import Budget
from .counting import Cost, count
from .data import Data, load_data
from .errors import AutopruneError
from .groups import ChannelGroups, apply_plan
from .options import SearchOptions
from .pareto import pareto_front
from .plan import Plan
from .runs import open_run
from .task import CLASSIFICATION, Task

__all__ = ["search", "SearchOptions", "load_pruned", "export_trial", "open_run", "pareto_front", "Result", "Budget",
           "Cost", "count", "Data", "load_data", "AutopruneError", "ChannelGroups", "apply_plan", "Plan", "Task", "CLASSIFICATION"]
__version__ = "0.1.0"
