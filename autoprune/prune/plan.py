"""A plan: which channels of each group the pruned model keeps.

The plan is the currency of autoprune. Trials store it, the Pareto front points
at it, ``export`` rebuilds from it, and a user rebuilds the pruned model from
the base weights and ``plan.json`` without unpickling any code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoprune.errors import AutopruneError
from autoprune.files import write_json

FORMAT = "autoprune-plan/1"


@dataclass(frozen=True)
class Plan:
    """Channels kept per group, with the criterion that chose them and the base identity.

    Example:
        >>> plan = Plan(kept={"conv1": (0, 2)}, channels={"conv1": 4}, importance="l1", base_model="ab12")
        >>> plan.keep
        {'conv1': 2}
    """

    kept: dict[str, tuple[int, ...]]
    channels: dict[str, int]
    importance: str = "l1"
    base_model: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def keep(self) -> dict[str, int]:
        """Number of channels kept per group."""
        return {gid: len(idxs) for gid, idxs in self.kept.items()}

    def ratios(self) -> dict[str, float]:
        """Share of channels removed per group."""
        return {gid: 1 - len(idxs) / self.channels[gid] for gid, idxs in self.kept.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "importance": self.importance,
            "groups": {
                gid: {"channels": self.channels[gid], "keep": len(idxs), "kept": list(idxs)}
                for gid, idxs in self.kept.items()
            },
            **({"meta": self.meta} if self.meta else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("format") != FORMAT:
            raise AutopruneError(
                f"not an autoprune plan (format {data.get('format')!r}, expected {FORMAT!r}); "
                "pass the plan.json that autoprune wrote"
            )
        groups = data["groups"]
        return cls(
            kept={gid: tuple(int(i) for i in g["kept"]) for gid, g in groups.items()},
            channels={gid: int(g["channels"]) for gid, g in groups.items()},
            importance=data.get("importance", "l1"),
            base_model=data.get("base_model", ""),
            meta=data.get("meta", {}),
        )

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise AutopruneError(f"plan file {path} does not exist; pass the plan.json of a run")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise AutopruneError(f"plan file {path} is not a valid autoprune plan ({err})") from None
