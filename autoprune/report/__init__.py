"""What a study found: its Pareto front, report.md with plots (report.html: report.html, the dashboard: report.dashboard)."""

from autoprune.report.pareto import best_under, non_dominated, pareto_front
from autoprune.report.plots import write_report

__all__ = ["best_under", "non_dominated", "pareto_front", "write_report"]


def __getattr__(name: str):  # autoprune.report was a module; its other names still resolve
    from autoprune._moved import old_attribute

    return old_attribute(__name__, name)
