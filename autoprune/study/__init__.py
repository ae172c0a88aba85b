"""The search: sensitivity, the space, trials, halving under a time budget, storage, workers, runs."""

from autoprune.study.space import SearchSpace
from autoprune.study.sensitivity import scan
from autoprune.study.trials import Problem, Settings, best_trial
from autoprune.study.halving import timed_search
from autoprune.study.storage import open_study
from autoprune.study.runs import Run, list_studies, open_run
from autoprune.study.weights import search_weights

__all__ = ["SearchSpace", "scan", "Problem", "Settings", "best_trial", "timed_search", "open_study", "Run", "list_studies", "open_run", "search_weights"]


def __getattr__(name: str):  # autoprune.study was a module; its other names still resolve
    from autoprune._moved import old_attribute

    return old_attribute(__name__, name)
