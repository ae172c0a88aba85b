"""What a model costs: the FLOPs/params predictor, budgets, and latency (predicted and timed)."""

from autoprune.cost.costmodel import CostModel
from autoprune.cost.budget import Budget, BudgetRange, fit_plan, parse_budget
from autoprune.cost.latency import LatencySettings, Meter
from autoprune.cost.timing import interleaved, latency_ms

__all__ = ["CostModel", "Budget", "BudgetRange", "fit_plan", "parse_budget", "LatencySettings", "Meter", "interleaved", "latency_ms"]
