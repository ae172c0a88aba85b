"""Searching within a wall-time budget: successive halving with weights carried from rung to rung.

A user has a time budget, not a trial count. ``--time-budget 30m`` plans the
run so it ends on time with its model exported:

1. the sensitivity scan gets at most :data:`SCAN_SHARE` of the time: it
   measures the grid coarse to fine and stops there;
2. the search gets :data:`SEARCH_SHARE` of what is left. It is one bracket of
   successive halving: ``n`` candidates are cut and fine-tuned ``r`` epochs,
   the best third go on for ``3r`` more epochs *from their own weights*, and
   so on until one is left, so each rung costs about the same and most of the
   search's training lands on the candidates that win;
3. the winner goes on from its weights into the final fine-tune, which gets
   every second still left.

Nothing the search trains is thrown away but the losers' short rungs. The
candidates are the sensitivity seed, the uniform allocation and plans on the
line through them and around the seed (:func:`start_candidates`), so the
search starts from the plan a user would otherwise have used. A rung shorter
than :data:`MIN_RUNG_EPOCHS` does not rank candidates, so where the time
allows no such bracket there is no race: the seed is only checked against
uniform for :data:`CHECK_EPOCHS`, and the better of them gets the whole fine-tune.

The race is the default only for budgets under :data:`RACE_BELOW` (10 minutes):
measured longer, it added nothing over giving the seed the whole fine-tune, so
from there on the search is that check alone (:func:`races`; ``--race`` asks
for the race at any budget, ``--no-race`` for none).

Example:
    >>> parse_duration("1h30m"), parse_duration("90s"), parse_duration("2.5m")
    (5400.0, 90.0, 150.0)
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace

import numpy as np
import optuna
import torch
from tqdm.auto import tqdm

from autoprune.cost.budget import NoFit, fit_plan, project
from autoprune.cost.latency import describe as describe_latency
from autoprune.errors import AutopruneError
from autoprune.inputs.data import Data
from autoprune.study.trials import (COMPLETE, PRUNED, Objective, Problem, Settings, keep_best_checkpoints,
                                           ratio_param)
from autoprune.study.workers import claim, recover
from autoprune.train.loop import evaluate, train

SCAN_SHARE = 0.15  # most of the time budget the sensitivity scan may take
SEARCH_SHARE = 0.35  # of the time left after the scan; the final fine-tune gets the rest
ETA = 3  # a rung keeps the best third of its candidates
# Candidates trained less than this are not told apart: on resnet18 at 2 % of its FLOPs (Fashion-MNIST),
# after a quarter epoch the seed, uniform and three perturbed plans all scored 80-81 % while their test
# accuracies after 4 epochs spread 87.9-88.5 %; only a poor plan (global ranking: 31 %) stood out.
MIN_RUNG_EPOCHS = 0.5
# With no race, the seed is checked against uniform pruning this long: on mobilenet_v2 at 10 % (Fashion-MNIST)
# an equal-drop seed from a scan cut short trained 5 points below uniform after an epoch.
CHECK_EPOCHS = 0.1
# The race is the default below this many seconds of time budget. On Fashion-MNIST (3 seeds, issue 23's anytime
# curve) at 10 min, 6-12 candidates raced added nothing over the seed trained for the whole time: resnet18 at 2 %
# 88.60 ± 0.34 % against 88.72 ± 0.04 %, mobilenet_v2 at 5 % 87.28 ± 0.38 % against 87.42 ± 0.30 %. At 2 min
# the 3-candidate race on resnet18 was 0.44 points above it (two seeds of three kept the seed's plan).
RACE_BELOW = 600.0
SPREAD = 0.3  # how far start candidates stray from the sensitivity seed (log channels kept)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^(?:([0-9]*\.?[0-9]+)\s*([smh]))+$")


def parse_duration(text: str | float) -> float:
    """Seconds in ``30m``, ``1h30m``, ``90s``, ``2.5m`` or a bare number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        cleaned = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"[0-9]*\.?[0-9]+", cleaned):
            seconds = float(cleaned)
        elif _DURATION.match(cleaned):
            seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"([0-9]*\.?[0-9]+)([smh])", cleaned))
        else:
            raise AutopruneError(f"cannot read time budget {text!r}; write it as 30m, 1h30m, 90s or 600")
    if not seconds > 0:
        raise AutopruneError(f"the time budget must be more than 0 seconds, not {text!r}")
    return seconds


def races(time_budget: float, race: bool | None = None) -> bool:
    """Whether a search given ``time_budget`` seconds races candidates: ``race`` where the user said,
    else only under :data:`RACE_BELOW`. Without a race the seed is checked against uniform and trains on.

    Example:
        >>> races(120), races(1800), races(1800, race=True), races(120, race=False)
        (True, False, True, False)
    """
    return time_budget < RACE_BELOW if race is None else race


class Deadline:
    """Seconds left until a fixed moment."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


@dataclass(frozen=True)
class Bracket:
    """One bracket of successive halving: ``candidates`` at first, rung ``k`` trains ``epochs * ETA**k``."""

    candidates: int
    rungs: int
    epochs: float

    def survivors(self, rung: int) -> int:
        return max(1, math.ceil(self.candidates / ETA ** rung))

    def cost(self) -> float:
        """Epochs trained by every candidate in every rung together."""
        return sum(self.survivors(k) * self.epochs * ETA ** k for k in range(self.rungs))


def plan_bracket(seconds: float, epoch_seconds: float, overhead: float, most: int) -> Bracket:
    """The widest bracket whose first rung still trains each candidate ``MIN_RUNG_EPOCHS``.

    Its width is a multiple of :data:`ETA` (at most ``most``), so more time buys
    more candidates in steps of three rather than only at powers of three: a
    bracket of ``n`` candidates has ``1 + floor(log_ETA n)`` rungs, each keeping
    the best third of the last, so at a power of three (3, 9, 27) it narrows to
    one candidate as before, and in between (6, 12, 15, ...) its last rung still
    races two or three. A bracket twice as wide as the three-candidate one needs
    twice its time at the shortest rung, so where three candidates were all that
    fitted (the 120 s benchmark rows) three is still the bracket.

    Where not even three candidates can be told apart in ``seconds``, the
    bracket is the first two (the sensitivity seed and uniform pruning) for
    :data:`CHECK_EPOCHS` each: enough to catch a seed far worse than uniform,
    while the winner's training goes to the final fine-tune in one schedule.
    Shorter still, it is the seed alone, untrained.

    ``overhead`` is what a candidate costs besides training (cut, thop check,
    scores); ``most`` caps the candidates (``--trials``).
    """
    # No race that ranks: the seed against uniform for CHECK_EPOCHS catches a poor seed, nothing finer.
    check = most >= 2 and seconds >= 2 * (overhead + CHECK_EPOCHS * epoch_seconds)
    best = Bracket(2, 1, CHECK_EPOCHS) if check else Bracket(1, 1, 0.0)
    for candidates in range(ETA, min(most, ETA ** 4) + 1, ETA):  # a bracket costs more the wider it is
        rungs = bracket_rungs(candidates)
        unit = Bracket(candidates, rungs, 1.0)
        epochs = (seconds - overhead * (candidates + rungs)) / (unit.cost() * epoch_seconds)
        if epochs < MIN_RUNG_EPOCHS:
            break
        best = Bracket(candidates, rungs, epochs)
    return best


def bracket_rungs(candidates: int) -> int:
    """Rungs of a bracket of ``candidates``: ``1 + floor(log_ETA candidates)`` (3: 2, 6: 2, 9: 3, 27: 4)."""
    rungs = 1
    while ETA ** rungs <= candidates:
        rungs += 1
    return rungs


@dataclass(frozen=True)
class Speed:
    """What a candidate at the budget costs here, in seconds."""

    epoch: float  # one fine-tune epoch
    score: float  # one pass over the scoring images
    cut: float  # projection, surgery and the thop check


def measure_speed(problem: Problem, settings: Settings, steps: int = 6) -> Speed:
    """Time a model at the budget (the sensitivity seed's): a few training steps, a score, a cut."""
    started = time.perf_counter()
    try:
        _, model, _ = fit_plan(problem.groups, problem.costs, problem.seed_ratios, problem.limits, problem.low,
                               problem.high, problem.round_to)
    except NoFit as err:  # the seed itself does not fit as built: no search can start
        raise AutopruneError(str(err)) from None
    cut = time.perf_counter() - started
    loader = problem.data.loader("train", settings.batch_size, shuffle=True, seed=settings.seed)
    train(model, loader, 2 / len(loader), problem.device, quiet=True, task=problem.data.task)  # warm-up: allocation, first calls
    started = time.perf_counter()
    train(model, loader, steps / len(loader), problem.device, quiet=True, task=problem.data.task)
    epoch = (time.perf_counter() - started) / steps * len(loader)
    started = time.perf_counter()
    evaluate(model, problem.data.loader("score", 256), problem.device, problem.data.task)
    return Speed(epoch, time.perf_counter() - started, cut)


def timed_search(problem: Problem, study: optuna.Study, settings: Settings, deadline: Deadline,
                 reserve: float = 0.0, quiet: bool = False, sampler: optuna.samplers.BaseSampler | None = None,
                 seed_first: bool = True) -> tuple[optuna.trial.FrozenTrial, float]:
    """Search until :data:`SEARCH_SHARE` of the time left is spent; the winner and the seconds its final
    fine-tune may train by the clock.

    ``settings.trials`` caps the candidates; without ``settings.race`` there are
    at most two (the seed checked against uniform, :func:`plan_bracket`). The final fine-tune gets what is
    left of ``deadline`` after ``reserve`` seconds (the export's own scoring
    and saving). A study that already has a winner searches no more.
    """
    recover(study)
    done = study.get_trials(deepcopy=False, states=(COMPLETE,))
    if done:
        chosen = max(done, key=lambda t: t.value)
    else:
        speed = measure_speed(problem, settings)
        left = deadline.left() - reserve
        most = settings.trials if settings.race else min(settings.trials, 2)  # two: no race, the check only
        bracket = plan_bracket(SEARCH_SHARE * left, speed.epoch, speed.cut + 2 * speed.score, most)
        if not quiet:
            kind = "" if settings.race else " (no race: --race asks for one)"
            print(f"time budget: {left:.0f} s left after the scan; search{kind}: {bracket.candidates} candidates, "
                  f"{bracket.rungs} rung(s) from {bracket.epochs:.2f} epochs (an epoch takes {speed.epoch:.1f} s)")
        study.sampler = sampler or optuna.samplers.TPESampler(seed=settings.seed + len(study.trials),
                                                              multivariate=True)
        study.pruner = optuna.pruners.NopPruner()  # the bracket decides who goes on
        chosen = successive_halving(problem, study, settings, bracket, deadline, quiet, seed_first)
    return chosen, max(deadline.left() - reserve, 0.0)


def search_by_the_clock(problem: Problem, study: optuna.Study, settings: Settings, deadline: Deadline,
                        per_image: float, quiet: bool = False) -> tuple[optuna.trial.FrozenTrial, Settings]:
    """:func:`timed_search` keeping back the export's own time (``per_image``: the base's seconds per
    image): the winner and the settings its final fine-tune trains with, by the clock until the deadline."""
    data = problem.data
    reserve = scoring_seconds(per_image, data) + per_image * len(data.test) + 2.0  # the base is tested too
    chosen, seconds_left = timed_search(problem, study, settings, deadline, reserve, quiet)
    # The final fine-tune trains by the clock (an epoch-time estimate would end early or late), or not at all.
    return chosen, replace(settings, final_epochs=0.0, final_seconds=seconds_left)


def scoring_seconds(per_image: float, data: Data) -> float:
    """About how long scoring a pruned model on the validation and test splits takes.

    ``per_image`` is the base model's time per image; a model at a tight budget
    scores in a fraction of it (a fifth, taken generously). What a time budget
    keeps back for the export's own scoring.
    """
    return 0.2 * per_image * (len(data.val) + len(data.test))


def start_candidates(problem: Problem, count: int, seed: int = 0, spread: float = SPREAD) -> list[np.ndarray]:
    """Pruning ratios for a bracket's first ``count`` candidates, the plans a short race should compare.

    A bracket of a few candidates is too short for a sampler to learn the space
    (TPE's first ten trials are random), so it spends them where good plans
    are: the sensitivity seed, uniform pruning, the line through them (half-way,
    and as far again past the seed), then the seed perturbed by ``spread`` (log
    channels kept), wider each time a perturbation lands on a plan already
    taken: at a tight budget rounding makes many nearby ratios one plan.
    """
    p = problem
    keep_seed = np.log(1.0 - np.clip(p.seed_ratios, p.low, p.high))
    keep_uniform = np.full_like(keep_seed, keep_seed.mean())
    line = [keep_seed, keep_uniform, (keep_seed + keep_uniform) / 2, 2 * keep_seed - keep_uniform]
    rng = np.random.default_rng(seed)
    found: dict[tuple, np.ndarray] = {}
    for attempt in range(20 * count):
        if len(found) == count:
            break
        logs = line[attempt] if attempt < len(line) else \
            keep_seed + rng.normal(0.0, spread * (1 + attempt / count), keep_seed.shape)
        ratios = np.clip(1.0 - np.exp(logs), p.low, p.high)
        kept = tuple(project(p.costs, ratios, p.limits, p.low, p.high, p.round_to).astype(int))
        found.setdefault(kept, ratios)
    return list(found.values())


def enqueue_starts(study: optuna.Study, problem: Problem, count: int, seed: int = 0) -> None:
    """Queue :func:`start_candidates` as the study's next trials."""
    for ratios in start_candidates(problem, count, seed):
        study.enqueue_trial({ratio_param(g): float(r) for g, r in zip(problem.costs.ids, ratios)},
                            skip_if_exists=True)


def successive_halving(problem: Problem, study: optuna.Study, settings: Settings, bracket: Bracket,
                       deadline: Deadline, quiet: bool = False, seed_first: bool = True) -> optuna.trial.FrozenTrial:
    """Run one bracket on ``study`` and return the winning trial (COMPLETE; the others PRUNED).

    Every candidate is an Optuna trial that stays open through the rungs it
    survives: its score after each rung is reported as step ``k + 1``, so the
    study keeps the whole race. Survivors keep their weights in memory between
    rungs; the winner's are saved as its checkpoint. A rung that would run past
    ``deadline`` is not started: the best candidate so far wins.
    """
    if seed_first:
        enqueue_starts(study, problem, bracket.candidates, settings.seed)
    objective = Objective(problem, settings, quiet)
    task = problem.data.task

    def show(value: float) -> str:
        return f"{task.name} {task.show(value)}"

    alive: list[tuple[optuna.Trial, torch.nn.Module, float]] = []
    bar = tqdm(total=bracket.candidates, desc="search: cut", unit="candidate", disable=quiet)
    for _ in range(bracket.candidates):
        trial = study.ask()
        claim(study, trial._trial_id)  # a rerun after a kill fails these trials at once
        started = time.perf_counter()
        try:
            alive.append((trial, objective.start(trial), started))
        except optuna.TrialPruned:  # no plan fits its latency cap as measured: the race goes on without it
            study.tell(trial, state=PRUNED)
        bar.update()
    bar.close()
    scores: dict[int, float] = {}
    for rung in range(bracket.rungs):
        epochs = bracket.epochs * ETA ** rung
        if rung and deadline.left() < _rung_seconds(alive, epochs):
            break
        for trial, model, started in tqdm(alive, desc=f"search: rung {rung + 1} of {bracket.rungs}",
                                          unit="candidate", disable=quiet):
            scores[trial.number] = objective.advance(trial, model, epochs, rung + 1, started)
            trial.report(scores[trial.number], rung + 1)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        alive.sort(key=lambda item: scores[item[0].number], reverse=True)
        keep = bracket.survivors(rung + 1) if rung + 1 < bracket.rungs else 1
        for trial, _, _ in alive[keep:]:
            _drop(study, trial, quiet, f"dropped after rung {rung + 1}: val {show(scores[trial.number])}")
        alive = alive[:keep]
    for trial, _, _ in alive[1:]:  # out of time before the last rung
        _drop(study, trial, quiet, f"out of time: val {show(scores[trial.number])}")
    trial, model, started = alive[0]
    objective.finish(trial, model, started)
    frozen = study.tell(trial, scores[trial.number])
    if not quiet:
        tqdm.write(f"trial {trial.number} wins: val {show(frozen.value)} after "
                   f"{frozen.user_attrs['epochs']:.2f} epochs | FLOPs {frozen.user_attrs['flops_share']:.1%} "
                   f"of base (thop MACs){describe_latency(frozen.user_attrs)}")
    keep_best_checkpoints(study, problem.checkpoints)
    return frozen


def _epoch_seconds(attrs: dict) -> float:
    """How long an epoch of a trial's training took, from its own rungs."""
    return attrs.get("train_seconds", 0.0) / max(attrs.get("epochs", 1.0), 1e-9)


def _rung_seconds(alive: list, epochs: float) -> float:
    """How long the next rung will take, from how fast the last one trained."""
    spent = [_epoch_seconds(t.user_attrs) for t, _, _ in alive]
    return len(alive) * epochs * float(np.mean(spent)) if spent else 0.0


def _drop(study: optuna.Study, trial: optuna.Trial, quiet: bool, why: str) -> None:
    """End a candidate the bracket does not carry on, as PRUNED with the reason."""
    trial.set_user_attr("dropped", why)
    study.tell(trial, state=PRUNED)
    if not quiet:
        tqdm.write(f"trial {trial.number}: {why}")

