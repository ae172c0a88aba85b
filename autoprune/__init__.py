"""autoprune: budgeted, sensitivity-guided structured pruning with Optuna.

Example:
    >>> import autoprune
    >>> result = autoprune.search("resnet18", "digits", budget="flops=0.25", trials=12)
    >>> model = autoprune.load_pruned(result.out)

The stages live in subpackages, in the order a search runs them: ``inputs`` (model, data, task),
``prune`` (groups, plans, surgery), ``cost`` (FLOPs, budgets, latency), ``train``, ``study``
(sensitivity, space, trials, halving, storage, workers, runs), ``export``, ``report``, and ``bench``.
"""

from autoprune import _moved
from autoprune.api import Result, export_trial, load_pruned, search
from autoprune.cost.budget import Budget
from autoprune.counting import Cost, count
from autoprune.errors import AutopruneError
from autoprune.inputs.data import Data, load_data
from autoprune.inputs.task import CLASSIFICATION, Task
from autoprune.options import ExportOptions, SearchOptions
from autoprune.prune.groups import ChannelGroups, apply_plan
from autoprune.prune.plan import Plan
from autoprune.report.pareto import pareto_front
from autoprune.study.runs import open_run

__all__ = ["search", "SearchOptions", "load_pruned", "export_trial", "ExportOptions", "open_run", "pareto_front",
           "Result", "Budget", "Cost", "count", "Data", "load_data", "AutopruneError", "ChannelGroups", "apply_plan",
           "Plan", "Task", "CLASSIFICATION"]
__version__ = "0.2.0"

_moved.install()  # autoprune.groups and the other paths from before the subpackages, with a warning
