"""Import paths from before the subpackages: ``autoprune.groups`` is ``autoprune.prune.groups`` now.

The old path imports the module at its new place, with a :class:`DeprecationWarning` naming it, so
code (and a pickle naming a class by its old module) keeps working for one release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

# old module -> new module; four old modules share their name with the subpackage that holds them now.
MOVED = {
    "task": "inputs.task", "models": "inputs.models", "data": "inputs.data",
    "plan": "prune.plan", "importance": "prune.importance", "groups": "prune.groups", "thinet": "prune.thinet",
    "costmodel": "cost.costmodel", "budget": "cost.budget", "latency": "cost.latency", "deploy": "export.formats",
    "training": "train.loop", "distill": "train.distill", "soft": "train.soft",
    "checks": "study.checks", "space": "study.space", "sensitivity": "study.sensitivity", "workers": "study.workers",
    "storage": "study.storage", "halving": "study.halving", "pipeline": "study.pipeline", "runs": "study.runs",
    "unstructured": "study.weights", "pareto": "report.pareto", "html_report": "report.html",
    "dashboard": "report.dashboard", "latency_bench": "bench.latency", "sweep": "bench.mlp_sweep",
}
NOW_PACKAGES = {"study": "study.trials", "export": "export.final", "report": "report.plots", "bench": "bench.equal_time"}


def _warn(old: str, new: str) -> None:
    frame, level = sys._getframe(0), 1  # blame the user's line, not the import machinery's
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith("<frozen importlib")):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{old} is deprecated: import {new} instead (the old path goes in the next release)",
                  DeprecationWarning, stacklevel=level)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``autoprune.<old>`` and hands back the module at its new place."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = name.rpartition(".")
        if package == "autoprune" and old in MOVED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = "autoprune." + MOVED[module.__name__.rpartition(".")[2]]
        _warn(module.__name__, new)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import statement returns this one


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())


def old_attribute(package: str, name: str) -> Any:
    """A name of the module that had ``package``'s name before it became a subpackage, with a warning."""
    new = "autoprune." + NOW_PACKAGES[package.rpartition(".")[2]]
    module = importlib.import_module(new)
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name}", f"{new}.{name}")
    return getattr(module, name)
