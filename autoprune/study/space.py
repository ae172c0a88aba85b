"""Search spaces: what a search may prune and how, in a YAML file a user can read and edit.

A space names the layers to leave alone, per-group ratio bounds, the
sensitivity grid, channel rounding and the importance criterion::

    name: resnet
    models: [resnet*, wide_resnet*]   # architectures it is picked for (model or class name)
    importance: l1                    # l1, l2, bn_scale, taylor, fpgm
    round_to: 8                       # keep multiples of 8 channels (fast kernels)
    max_ratio: 0.9                    # most of any group a trial may remove
    grid: [0.1, 0.3, 0.5, 0.7, 0.9]   # sensitivity ratios
    ignore: [conv1]                   # layer name patterns (fnmatch) never pruned
    bounds:                           # group id pattern: [lowest, highest] ratio; first match wins
      "layer4.*": [0.0, 0.8]

Spaces for common families ship in ``autoprune/search_spaces/``; ``for_model``
picks one by architecture, ``load_space`` reads a user's file. Every value is
checked on load, and the layer and group patterns again against the model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import yaml
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.prune.importance import CRITERIA

if TYPE_CHECKING:
    from autoprune.options import SearchOptions

SPACES_DIR = Path(__file__).parents[1] / "search_spaces"
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KEYS = ("name", "description", "models", "importance", "round_to", "max_ratio", "grid", "ignore", "bounds")


@dataclass(frozen=True)
class SearchSpace:
    """What a search may prune: see the module docstring for the YAML form.

    Example:
        >>> space = SearchSpace(bounds={"layer4.*": (0.0, 0.5)})
        >>> space.ratio_bounds(["conv1", "layer4.0.conv1"])
        (array([0., 0.]), array([0.9, 0.5]))
    """

    name: str = "default"
    description: str = ""
    models: tuple[str, ...] = ()
    importance: str = "l1"
    round_to: int = 1
    max_ratio: float = 0.9
    grid: tuple[float, ...] = DEFAULT_GRID
    ignore: tuple[str, ...] = ()
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        where = f"search space {self.source or self.name}"
        if self.importance not in CRITERIA:
            raise AutopruneError(f"{where}: unknown importance {self.importance!r}; "
                                 f"choose one of {', '.join(CRITERIA)}")
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or not 1 <= self.round_to <= 256:
            raise AutopruneError(f"{where}: round_to must be a whole number from 1 to 256, not {self.round_to!r}")
        if not _is_ratio(self.max_ratio) or not 0 < self.max_ratio < 1:
            raise AutopruneError(f"{where}: max_ratio must lie strictly between 0 and 1, not {self.max_ratio!r}")
        if not self.grid or not all(_is_ratio(r) and 0 < r < 1 for r in self.grid):
            raise AutopruneError(f"{where}: grid must be ratios strictly between 0 and 1, e.g. [0.1, 0.5, 0.9]; "
                                 f"got {list(self.grid)!r}")
        for pattern, pair in self.bounds.items():
            ok = (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_ratio(v) for v in pair)
                  and 0 <= pair[0] <= pair[1] < 1)
            if not ok:
                raise AutopruneError(f"{where}: bounds for {pattern!r} must be [low, high] with "
                                     f"0 <= low <= high < 1, not {pair!r}")

    def ratio_bounds(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest pruning ratio per group id: the first matching pattern, else [0, max_ratio]."""
        low, high = np.zeros(len(ids)), np.full(len(ids), self.max_ratio)
        for i, gid in enumerate(ids):
            for pattern, (lo, hi) in self.bounds.items():
                if fnmatch.fnmatchcase(gid, pattern):
                    low[i], high[i] = lo, min(hi, self.max_ratio)
                    break
        return low, high

    def check_layers(self, model: nn.Module) -> None:
        """Refuse an ignore pattern that matches none of ``model``'s layers, listing some that exist."""
        names = [n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
        for pattern in self.ignore:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise AutopruneError(f"search space {self.source or self.name}: ignore pattern {pattern!r} "
                                     f"matches no layer; layers are e.g. {_examples(names)}")

    def check_groups(self, ids: Sequence[str]) -> None:
        """Refuse a bounds pattern that matches no group id, listing the ids (``autoprune groups``)."""
        for pattern in self.bounds:
            if not any(fnmatch.fnmatchcase(gid, pattern) for gid in ids):
                raise AutopruneError(f"search space {self.source or self.name}: bounds pattern {pattern!r} "
                                     f"matches no group; groups are {_examples(list(ids))} "
                                     "(see autoprune groups --model …)")

    def matches(self, model: nn.Module | str) -> bool:
        """Whether this space is meant for ``model`` (by torchvision name or class name)."""
        names = [model] if isinstance(model, str) else []
        if isinstance(model, nn.Module):
            names.append(type(model).__name__)
        names = [Path(n.rpartition(":")[2]).stem.lower() for n in names]
        return any(fnmatch.fnmatchcase(n, p.lower()) for n in names for p in self.models)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, stored with the study so a resumed search uses the same space."""
        return {"name": self.name, "importance": self.importance, "round_to": self.round_to,
                "max_ratio": self.max_ratio, "grid": list(self.grid), "ignore": list(self.ignore),
                "bounds": {k: list(v) for k, v in self.bounds.items()}}

    def replace(self, **changes: Any) -> SearchSpace:
        """A copy with ``changes`` (``None`` values are ignored), validated again."""
        values = {**self.__dict__, **{k: v for k, v in changes.items() if v is not None}}
        values["grid"] = tuple(values["grid"])
        return SearchSpace(**values)


def _is_ratio(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _examples(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


def _as_list(value: Any, key: str, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise AutopruneError(f"search space {where}: {key} must be a list, not {type(value).__name__}")
    return value


def parse_space(data: Any, where: str) -> SearchSpace:
    """A ``SearchSpace`` from a YAML mapping; unknown keys and bad values are refused."""
    if not isinstance(data, dict):
        raise AutopruneError(f"search space {where} must be a YAML mapping with keys {', '.join(KEYS)}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise AutopruneError(f"search space {where}: unknown key {unknown[0]!r}; valid keys are {', '.join(KEYS)}")
    bounds = data.get("bounds") or {}
    if not isinstance(bounds, dict):
        raise AutopruneError(f"search space {where}: bounds must map group patterns to [low, high]")
    return SearchSpace(
        name=str(data.get("name", Path(where).stem)),
        description=str(data.get("description", "")),
        models=tuple(str(m) for m in _as_list(data.get("models"), "models", where)),
        importance=str(data.get("importance", "l1")),
        round_to=data.get("round_to", 1),
        max_ratio=data.get("max_ratio", 0.9),
        grid=tuple(_as_list(data.get("grid", list(DEFAULT_GRID)), "grid", where)),
        ignore=tuple(str(p) for p in _as_list(data.get("ignore"), "ignore", where)),
        bounds={str(k): tuple(v) if isinstance(v, list) else v for k, v in bounds.items()},
        source=where,
    )


def shipped() -> dict[str, Path]:
    """The spaces that come with autoprune, by name."""
    return {p.stem: p for p in sorted(SPACES_DIR.glob("*.yaml"))}


def load_space(spec: str | Path) -> SearchSpace:
    """Read a space from a YAML file, or a shipped one by name (``resnet``, ``mobilenet``, …).

    Example:
        >>> load_space("resnet").round_to
        8
    """
    path = Path(spec)
    if not path.is_file():
        if str(spec) in shipped():
            path = shipped()[str(spec)]
        else:
            raise AutopruneError(f"search space {spec} is neither a YAML file nor a shipped space "
                                 f"({', '.join(shipped())})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AutopruneError(f"search space {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_space(data, str(path))


def for_model(model: nn.Module | str) -> SearchSpace:
    """The shipped space for ``model``'s architecture, or ``default`` when none claims it."""
    for name, path in shipped().items():
        if name != "default":
            space = load_space(path)
            if space.matches(model):
                return space
    return load_space(shipped()["default"])


def resolve(space: SearchSpace | str | Path | None, model: nn.Module | str) -> SearchSpace:
    """``space`` itself, the file or shipped name it gives, or the one picked for ``model``."""
    if isinstance(space, SearchSpace):
        return space
    return for_model(model) if space is None else load_space(space)


def for_search(model: nn.Module | str, options: SearchOptions) -> SearchSpace:
    """The space a search runs in: ``options.space`` (or ``model``'s) with the options' overrides of its
    grid, largest ratio, importance and rounding."""
    o = options
    return resolve(o.space, model).replace(grid=tuple(o.grid) if o.grid else None, max_ratio=o.max_ratio,
                                           importance=o.importance, round_to=o.round_to)
