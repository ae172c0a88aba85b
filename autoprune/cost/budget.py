"""Budgets, and projecting any allocation of pruning ratios onto one.

A budget caps FLOPs (thop MACs), params, latency, or several: ``flops=0.3`` keeps
30 % of the base model's FLOPs, ``flops=120M`` and ``params=1.5M`` are absolute,
``latency=3ms`` (or ``latency=0.5`` of the base's) caps the measured latency
(:mod:`autoprune.cost.latency`), and ``flops=0.3,params=2M`` caps both. A range,
``flops=0.05..0.5``, asks for the whole trade-off in one study (:class:`BudgetRange`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from torch import nn

from autoprune.cost.costmodel import CostModel
from autoprune.counting import Cost, count, human
from autoprune.errors import AutopruneError
from autoprune.prune.groups import ChannelGroups
from autoprune.prune.plan import Plan
from autoprune.prune.rounding import next_count, round_counts

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TERM = re.compile(r"^\s*(flops|params)\s*=\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(%|[KMGT])?\s*$", re.I)
_LATENCY = re.compile(r"^\s*latency\s*=\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(%|ms|us|µs|s)?\s*$", re.I)
_TO_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}
USAGE = ("write it as flops=0.3 (a share of the base), flops=120M, params=1.5M, latency=3ms (or latency=0.5 "
         "of the base's), or several: flops=0.3,params=2M")


@dataclass(frozen=True)
class Budget:
    """A cap on FLOPs and/or params; each is a share of the base (``relative``) or a count.

    Example:
        >>> Budget.parse("flops=0.25").limits(Cost(flops=100e6, params=1e6))
        Cost(flops=25000000.0, params=inf)
    """

    flops: float | None = None
    params: float | None = None
    flops_relative: bool = True
    params_relative: bool = True
    latency: float | None = None  # milliseconds, or a share of the base model's latency
    latency_relative: bool = True

    @classmethod
    def parse(cls, text: str) -> Budget:
        values: dict[str, tuple[float, bool]] = {}
        for term in str(text).split(","):
            if term.strip().lower().startswith("latency"):
                if "latency" in values:
                    raise AutopruneError(f"budget {text!r} gives latency twice; {USAGE}")
                values["latency"] = _latency_term(term)
                continue
            match = _TERM.match(term)
            if not match:
                raise AutopruneError(f"cannot read budget {text!r}: {USAGE}")
            key, number, suffix = match.group(1).lower(), float(match.group(2)), (match.group(3) or "")
            if key in values:
                raise AutopruneError(f"budget {text!r} gives {key} twice; {USAGE}")
            if suffix == "%":
                value, relative = number / 100, True
            elif suffix or number > 1:
                value, relative = number * _SUFFIX[suffix.upper()], False
            else:
                value, relative = number, True
            if value <= 0 or (relative and value > 1):
                raise AutopruneError(f"budget {term.strip()!r} must keep more than 0 and at most all "
                                     f"of the base model; {USAGE}")
            values[key] = (value, relative)
        flops, params, latency = (values.get(k, (None, True)) for k in ("flops", "params", "latency"))
        return cls(flops[0], params[0], flops[1], params[1], latency[0], latency[1])

    def limits(self, base: Cost) -> Cost:
        """The absolute caps for a base model of cost ``base`` (``inf`` where uncapped; a latency in ms)."""
        def cap(value: float | None, relative: bool, full: float) -> float:
            if value is None:
                return math.inf
            return value * full if relative else value
        return Cost(cap(self.flops, self.flops_relative, base.flops),
                    cap(self.params, self.params_relative, base.params),
                    cap(self.latency, self.latency_relative, base.latency))

    def __str__(self) -> str:
        parts = []
        for key, value, relative in (("flops", self.flops, self.flops_relative),
                                     ("params", self.params, self.params_relative)):
            if value is not None:
                parts.append(f"{key}={value:g}" if relative else f"{key}={human(value)}")
        if self.latency is not None:
            parts.append(f"latency={self.latency:g}" + ("" if self.latency_relative else "ms"))
        return ",".join(parts)


STRATA = 6  # targets a range study spreads its trials over (the front's resolution along the range)


@dataclass(frozen=True)
class BudgetRange:
    """A range of caps on one quantity: ``flops=0.05..0.5`` or ``params=1M..4M``.

    A range study fixes ``strata`` targets log-spaced from ``low`` to ``high``
    (equal steps in log FLOPs, as accuracy changes with the order of magnitude
    pruned) and projects each trial onto one of them exactly as a single
    budget's trial is projected. Its feasibility cap is the upper end.

    Example:
        >>> [str(b) for b in BudgetRange.parse("flops=0.1..0.4").targets(3)]
        ['flops=0.1', 'flops=0.2', 'flops=0.4']
    """

    low: Budget
    high: Budget
    key: str

    @classmethod
    def parse(cls, text: str) -> BudgetRange:
        usage = "write a range as flops=0.05..0.5 or params=1M..4M, one quantity, the smaller end first"
        match = re.match(r"^\s*(flops|params)\s*=\s*([^.,]*\.?[^.,]*)\s*\.\.\s*(.+)$", str(text), re.I)
        if not match or "," in text:
            raise AutopruneError(f"cannot read budget range {text!r}: {usage}")
        key = match.group(1).lower()
        ends = []
        for end in (match.group(2), match.group(3)):
            try:
                ends.append(Budget.parse(f"{key}={end.strip()}"))
            except AutopruneError:
                raise AutopruneError(f"cannot read budget range {text!r}: {end.strip()!r} is not a "
                                     f"{key} budget; {usage}") from None
        low, high = ends
        value = lambda b: getattr(b, key)  # noqa: E731
        relative = lambda b: getattr(b, f"{key}_relative")  # noqa: E731
        if relative(low) != relative(high):
            raise AutopruneError(f"budget range {text!r} mixes a share and a count; {usage}")
        if not value(low) < value(high):
            raise AutopruneError(f"budget range {text!r} must go from the smaller to the larger end; {usage}")
        return cls(low, high, key)

    def targets(self, strata: int = STRATA) -> list[Budget]:
        """``strata`` budgets log-spaced from the lower end to the upper end, both included."""
        low, high = getattr(self.low, self.key), getattr(self.high, self.key)
        values = [float(f"{v:.3g}") for v in np.geomspace(low, high, strata)]  # readable, ends exact
        relative = getattr(self.low, f"{self.key}_relative")
        return [Budget(**{self.key: float(v), f"{self.key}_relative": relative}) for v in values]

    @property
    def latency(self) -> None:
        """A range spans FLOPs or params; it caps no latency."""
        return None

    def limits(self, base: Cost) -> Cost:
        """The upper end's caps: every trial of the range meets them."""
        return self.high.limits(base)

    def __str__(self) -> str:
        return f"{self.low}..{str(self.high).split('=', 1)[1]}"


def parse_budget(text: str | Budget | BudgetRange) -> Budget | BudgetRange:
    """A :class:`Budget`, or a :class:`BudgetRange` where ``text`` has ``..``.

    Example:
        >>> parse_budget("flops=0.05..0.5")
        BudgetRange(low=Budget(flops=0.05, ...), high=Budget(flops=0.5, ...), key='flops')
    """
    if isinstance(text, (Budget, BudgetRange)):
        return text
    return BudgetRange.parse(text) if ".." in str(text) else Budget.parse(text)


def _latency_term(term: str) -> tuple[float, bool]:
    """``latency=3ms`` (also us, s) -> (3.0, False); ``latency=0.5`` or ``50%`` -> (0.5, True)."""
    match = _LATENCY.match(term)
    if not match:
        raise AutopruneError(f"cannot read budget term {term.strip()!r}: {USAGE}")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit in _TO_MS:
        value, relative = number * _TO_MS[unit], False
    else:
        value, relative = (number / 100 if unit == "%" else number), True
    if value <= 0 or (relative and value > 1):
        raise AutopruneError(f"budget {term.strip()!r} must be a time with its unit (latency=3ms, 500us) or a "
                             f"share of the base model's latency above 0 and at most 1 (latency=0.5); {USAGE}")
    return value, relative


def fits(cost: Cost | tuple[float, ...], limits: Cost) -> bool:
    """Whether ``cost`` (a Cost, or a predictor's (FLOPs, params[, latency])) is within every cap."""
    values = cost if isinstance(cost, tuple) else (cost.flops, cost.params, cost.latency)
    return all(v <= cap for v, cap in zip(values, (limits.flops, limits.params, limits.latency)))


def usage(cost: Cost, limits: Cost) -> float:
    """How much of the budget ``cost`` uses: the larger share over the capped quantities."""
    shares = [c / l for c, l in ((cost.flops, limits.flops), (cost.params, limits.params),
                                 (cost.latency, limits.latency)) if l < math.inf]
    return max(shares) if shares else 0.0


def steps(costs: CostModel, round_to: int = 1) -> np.ndarray:
    """The channel step of each group: a multiple of ``round_to`` and of the group's block count.

    A group narrower than that step moves in steps of its blocks alone.
    """
    units = costs.units.astype(int)
    wanted = np.array([np.lcm(int(u), int(round_to)) for u in units], dtype=np.float64)
    return np.where(costs.channels >= wanted, wanted, units)


def keep_counts(costs: CostModel, ratios: np.ndarray, round_to: int = 1) -> np.ndarray:
    """Channels kept per group for pruning ``ratios``: multiples of ``round_to`` (and of each
    group's blocks, see ``Group.unit``) down to one step, whole blocks below it, at most all."""
    return round_counts(costs.channels * (1.0 - ratios), steps(costs, round_to), costs.units, costs.channels)


def smallest(costs: CostModel, high: np.ndarray, round_to: int = 1) -> Cost:
    """The cheapest model the bounds allow: every group pruned to its upper bound."""
    return Cost(*costs.predict_vector(keep_counts(costs, high, round_to)))


def check_prunes(budget: Budget, limits: Cost, base: Cost) -> None:
    """Refuse a budget the unpruned model already meets: the search would hand back the base model.

    ``flops=150%`` is refused when parsed; an absolute cap (``flops=999G``) only here,
    once the base model's cost is known.
    """
    if limits.flops >= base.flops and limits.params >= base.params and limits.latency >= base.latency:
        raise AutopruneError(f"budget {budget} does not prune: the base model already meets it ({base}); "
                             "ask for less than the base, e.g. flops=0.5")


def check_reachable(costs: CostModel, limits: Cost, high: np.ndarray, round_to: int = 1) -> None:
    """Refuse, before any search, a budget that no allocation within the bounds meets."""
    least = smallest(costs, high, round_to)
    if fits(least, limits):
        return
    base = costs.base
    asks = [f"{key}={math.ceil(1000 * value / full) / 1000:g}"
            for key, value, full, cap in (("flops", least.flops, base.flops, limits.flops),
                                          ("params", least.params, base.params, limits.params),
                                          ("latency", least.latency, base.latency, limits.latency))
            if value > cap]
    timed = (f" and a predicted latency of {least.latency:.3g} ms ({least.latency / base.latency:.1%} of base)"
             if math.isfinite(least.latency) else "")
    raise AutopruneError(
        f"budget cannot be met: the smallest reachable model has {human(least.flops)} FLOPs "
        f"(thop MACs, {least.flops / base.flops:.1%} of base) and {human(least.params)} params "
        f"({least.params / base.params:.1%} of base){timed}; ask for at least {' and '.join(asks)}, "
        "or widen the ratio bounds"
    )


def project(
    costs: CostModel,
    ratios: np.ndarray,
    limits: Cost,
    low: np.ndarray,
    high: np.ndarray,
    round_to: int = 1,
    steps: int = 40,
) -> np.ndarray:
    """Scale an allocation of pruning ratios so the model fills the budget without passing it.

    Channels kept per group are ``alpha * (1 - ratio)``, clipped to the bounds;
    bisection finds the largest ``alpha`` whose rounded plan still fits, so the
    result keeps the proportions of the proposal and uses the budget well.
    Returns channels kept per group, in ``costs.ids`` order.
    """
    check_reachable(costs, limits, high, round_to)
    keep_share = 1.0 - np.clip(ratios, low, high)

    def kept_at(alpha: float) -> np.ndarray:
        share = np.clip(alpha * keep_share, 1.0 - high, 1.0 - low)
        return keep_counts(costs, 1.0 - share, round_to)

    lo, hi = 0.0, float(1.0 / max(keep_share.min(), 1e-6))
    if fits(costs.predict_vector(kept_at(hi)), limits):
        return kept_at(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fits(costs.predict_vector(kept_at(mid)), limits):
            lo = mid
        else:
            hi = mid
    return _fill(costs, kept_at(lo), limits, np.floor(costs.channels * (1.0 - low)), round_to)


def _fill(costs: CostModel, kept: np.ndarray, limits: Cost, most: np.ndarray, round_to: int) -> np.ndarray:
    """Give back channels one step at a time while the budget allows.

    Rounding leaves budget unused, most on small models whose groups are a few
    channels wide; the groups pruned hardest get their channels back first.
    """
    step, unit = steps(costs, round_to), costs.units
    kept = kept.copy()
    for _ in range(4 * len(kept)):
        grown = False
        for i in np.argsort(kept / costs.channels):
            before = kept[i]
            kept[i] = next_count(before, step[i], unit[i])
            if kept[i] <= most[i] and fits(costs.predict_vector(kept), limits):
                grown = True
            else:
                kept[i] = before
        if not grown:
            break
    return kept


def fit_plan(groups: ChannelGroups, costs: CostModel, ratios: np.ndarray, limits: Cost,
             low: np.ndarray, high: np.ndarray, round_to: int = 1,
             meta: dict | None = None) -> tuple[Plan, nn.Module, Cost]:
    """Project ``ratios`` onto the budget, build the model and confirm it with thop.

    The predictor matches thop closely but not to the last MAC; if the built
    model is over budget the target is tightened by the overshoot and the
    projection repeated, so what comes back always fits as thop counts it.
    Under a latency cap ``costs`` is a :class:`~autoprune.cost.latency.LatencyCosts`
    and every built model is timed as well (``costs.measure``).
    """
    target, least = limits, smallest(costs, high, round_to)
    for _ in range(6):
        kept = project(costs, ratios, target, low, high, round_to)
        plan = groups.plan(dict(zip(costs.ids, kept.astype(int).tolist())), meta)
        model = groups.apply(plan)
        cost = count(model, groups.example_input)
        if math.isfinite(limits.latency):
            cost = Cost(cost.flops, cost.params, costs.measure(model, limits.latency))
        if fits(cost, limits):
            return plan, model, cost
        if target == least:  # the smallest model the bounds allow, and it is over: nothing else will fit
            break
        tighter = _tightened(target, Cost(*costs.predict_vector(kept)), cost, limits)
        # Past what the bounds reach by prediction, the last try is their smallest model.
        target = tighter if fits(least, tighter) else least
    raise NoFit(f"could not fit a plan into the budget ({cost} measured); loosen the budget or the ratio bounds")


class NoFit(Exception):
    """No plan within the bounds fits the budget as built and measured (the predictor promised one):
    a search drops that candidate, where a budget no plan reaches by prediction is refused up front.

    A signal between stages, not a user's mistake (not an :class:`AutopruneError`): a caller that
    cannot drop the candidate says so to the user as one."""


def _tightened(target: Cost, predicted: Cost, built: Cost, limits: Cost) -> Cost:
    """The next projection's target after a built model came out over ``limits``: each cap it broke is
    aimed below the plan's *prediction* by the overshoot (tightening the target alone moves nothing
    while the prediction sits well under it, as latency's can by a few per cent)."""
    def aim(t: float, p: float, cap: float, c: float) -> float:
        return min(t, p) * cap / c * 0.999 if math.isfinite(cap) and c > cap else t

    return Cost(*(aim(*values) for values in zip(
        (target.flops, target.params, target.latency), (predicted.flops, predicted.params, predicted.latency),
        (limits.flops, limits.params, limits.latency), (built.flops, built.params, built.latency))))
