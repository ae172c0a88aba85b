"""The stages every search shares, channel or weight, and the benchmark.

A search is: :func:`prepare` (the data, the run folder and its storage, the trained
base model) → :func:`find_groups` (:mod:`autoprune.prune.groups`) and :func:`budget_limits` →
:func:`score_base` → sensitivity (:mod:`autoprune.study.sensitivity`) → :func:`bounded_problem` →
search (:mod:`autoprune.study.trials`, :mod:`autoprune.study.halving`) → export
(:mod:`autoprune.export.final`). :func:`autoprune.api.search`,
:func:`autoprune.study.weights.search_weights` and :mod:`autoprune.bench.equal_time` run these stages;
what differs between them is which ones and with what.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optuna
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autoprune.cost.budget import STRATA, Budget, BudgetRange, check_prunes, check_reachable
from autoprune.cost.costmodel import CostModel
from autoprune.cost.latency import Meter, latency_costs
from autoprune.counting import Cost, human
from autoprune.errors import AutopruneError
from autoprune.files import fingerprint, save_torch
from autoprune.inputs.data import Data, from_splits, load_data
from autoprune.inputs.models import build_model, check_picklable, load_weights
from autoprune.inputs.task import Task, load_task, validate
from autoprune.options import BASE_EPOCHS, BASE_LR, SearchOptions
from autoprune.prune.groups import ChannelGroups
from autoprune.prune.importance import criterion
from autoprune.prune.plan import Plan
from autoprune.prune.thinet import rerank
from autoprune.study.checks import check_run, claim_run
from autoprune.study.sensitivity import bounds, equal_drop
from autoprune.study.storage import stored_config
from autoprune.study.space import SearchSpace
from autoprune.study.trials import Problem, Stratum
from autoprune.train.distill import Distill
from autoprune.train.loop import evaluate, resolve_device, train
from autoprune.train.teacher import TEACHER_OUTPUTS, TeacherOutputs, teacher_outputs, uncached


@dataclass
class Result:
    """What a search hands back: the pruned model, its plan, the summary and the study."""

    model: nn.Module
    plan: Plan
    summary: dict[str, Any]
    study: optuna.Study
    out: Path


def as_data(data: Data | str | Sequence[Dataset | DataLoader], task: Task | str | None = None,
            **options: Any) -> Data:
    """``data`` as a :class:`Data` judged by ``task`` (:func:`~autoprune.inputs.task.load_task`; None: a
    Data's own task, else classification): a data set name or path (``options`` go to
    :func:`load_data`), a Data, or (train, val, test) datasets or loaders."""
    if isinstance(data, Data):
        return data if task is None else data.with_task(load_task(task))
    task = load_task(task)
    if isinstance(data, (str, Path)):
        return load_data(str(data), task=task, **options)
    if isinstance(data, (tuple, list)) and len(data) == 3:
        return from_splits("user", *data, task=task)
    raise AutopruneError("data must be a data set name, a Data, or (train, val, test) datasets or loaders")


def slug(text: str) -> str:
    """``text`` as a file-name-safe part of a study name (``flops=0.25`` → ``flops0.25``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text.replace("=", "").replace(",", "-"))


def run_folder(model: nn.Module | str, data: Data, budget: Any, study: str | None, out: str | Path | None,
               kind: str = "") -> tuple[str, str, Path]:
    """(model name, study name, run folder): ``results/<model>-<data>-[<kind>-]<budget>`` unless given."""
    name = model if isinstance(model, str) else type(model).__name__
    parts = [slug(Path(name).stem), slug(data.name), *([kind] if kind else []), slug(str(budget))]
    study_name = study or "-".join(parts)
    return name, study_name, Path(out) if out else Path("results") / study_name


def default_storage(out: Path, workers: int = 1) -> str:
    """The run folder's study: SQLite for one process, a journal file for several (or where one is)."""
    journal, sqlite = out / "study.log", out / "study.db"
    if journal.is_file() or (workers > 1 and not sqlite.is_file()):
        return str(journal)
    return f"sqlite:///{sqlite}"


def base_model(model: nn.Module | str, weights: str | None, data: Data, out: Path,
               train_epochs: float | None) -> tuple[nn.Module, float]:
    """The base model with its weights, and how many epochs it still has to be trained."""
    if isinstance(model, nn.Module):
        if weights:
            load_weights(model, weights)
        return model, train_epochs or 0.0
    saved = out / "base.pt"
    if weights in (None, "DEFAULT") and saved.is_file():  # trained by an earlier run
        return load_weights(build_model(model, data.num_classes, input_shape=data.input_shape), saved), 0.0
    built = build_model(model, data.num_classes, pretrained=weights == "DEFAULT", input_shape=data.input_shape)
    if weights and weights != "DEFAULT":
        return load_weights(built, weights), train_epochs or 0.0
    if train_epochs is not None:
        return built, train_epochs
    head_only = weights == "DEFAULT" and data.num_classes == 1000
    return built, 0.0 if head_only else BASE_EPOCHS


def train_base(base: nn.Module, data: Data, epochs: float, device: torch.device, batch_size: int, seed: int,
               out: Path, quiet: bool, lr: float = BASE_LR) -> None:
    """Train the base model and keep it as ``out/base.pt``, so the next run of the study reuses it.

    A model that ends near chance on validation is refused and not kept: pruning
    it would measure nothing (vgg11_bn on digits needs a base learning rate of 0.01).
    """
    torch.manual_seed(seed)
    train(base, data.loader("train", batch_size, shuffle=True, seed=seed), epochs, device, lr=lr,
          desc="train base", quiet=quiet, task=data.task)
    accuracy = evaluate(base, data.loader("val", 256), device, data.task)
    if data.task.is_classification and accuracy < 2.0 / data.num_classes:
        raise AutopruneError(f"the base model trained to {accuracy:.1%} validation accuracy, near chance "
                             f"({1 / data.num_classes:.0%}); train it with a smaller --base-lr (was {lr:g}) "
                             "or more --train-epochs, or pass trained --weights")
    save_torch(base.state_dict(), out / "base.pt")


@dataclass
class Prepared:
    """A search ready for its stages: the data, names, run folder, storage, device and trained base
    (a stored study with its folder, read back later, is :class:`autoprune.study.runs.Run`)."""

    data: Data
    name: str  # the model's name as the study records it
    study: str
    out: Path
    storage: str
    shared: bool  # the storage was given: processes on other machines may work on the study
    device: torch.device
    base: nn.Module
    base_id: str  # fingerprint of the base model's weights


def prepare(model: nn.Module | str, data: Data | str | Sequence, budget: Any, options: SearchOptions,
            kind: str = "", before_training: Callable[[nn.Module, Data], object] | None = None) -> Prepared:
    """The first stage: data, run folder and storage (refused, before anything is written, if they
    cannot be used), and the base model, trained and kept in the run folder if it has to be.

    ``before_training(base, data)`` may refuse the untrained base (a bad space or budget), so a
    mistake costs no training.
    """
    o = options
    data = as_data(data, o.task, data_dir=o.data_dir, download=o.download, seed=o.seed)
    if o.distill and not data.task.is_classification and data.task.distill_loss is None:
        raise AutopruneError(f"--distill softens a classifier's logits; task {data.task.label} is not "
                             "classification and gives no distill_loss: leave out --distill, or give the "
                             "Task a distill_loss(student_output, teacher_output, batch)")
    name, study, out = run_folder(model, data, budget, o.study, o.out, kind=kind)
    storage = o.storage or default_storage(out, o.workers)
    if o.workers > 1 and storage.startswith("sqlite"):
        raise AutopruneError("SQLite cannot take several worker processes; for --workers pass "
                             f"--storage {out / 'study.log'} (a journal file) or a PostgreSQL/MySQL URL")
    check_run(out, study, storage)
    device = resolve_device(o.device)
    base, epochs = base_model(model, o.weights, data, out, o.train_epochs)
    validate(data.task, base, next(iter(data.loader("val", 8))), device)  # before anything is written
    check_picklable(base, name)
    if epochs > 0:
        if before_training:
            before_training(base, data)
        claim_run(out, study)
        train_base(base, data, epochs, device, o.batch_size, o.seed, out, o.quiet, o.base_lr)
    base = base.to(device).eval()
    return Prepared(data, name, study, out, storage, o.storage is not None, device, base,
               fingerprint(base.state_dict()))


def distillation(prepared: Prepared, options: SearchOptions) -> SearchOptions:
    """``options`` with ``distill`` decided, before anything is written.

    ``--distill`` or ``--no-distill`` decides. Left out (``distill=None``), a resumed study distills as it
    was made, and a new one distills a classifier whose outputs can be computed once
    (:func:`~autoprune.train.teacher.uncached`): at equal wall time that gained about a point of test
    accuracy on both benchmark models (``docs/benchmarks.md``). Where they cannot (random augmentation,
    ...) it does not, as a live teacher slows every step, and one line says why. A task of the user's
    own opts in with ``--distill`` and its ``distill_loss``.
    """
    o, r = options, prepared
    if o.distill is not None:
        return o
    stored = None if o.new_study else stored_config(r.study, r.storage)
    if stored is not None or not r.data.task.is_classification:  # as it was made; a task opts in
        return o.replace(distill=stored is not None and "distill" in stored)
    why = uncached(r.data)
    if why and not o.quiet:
        print(f"distillation: off (--distill runs the teacher live in every step): {why}")
    return o.replace(distill=not why)


def distill_outputs(prepared: Prepared, options: SearchOptions) -> TeacherOutputs | None:
    """Where it distills, the base model's outputs on the training set, computed once into the run
    folder (``teacher_outputs.pt``) and reused by every fine-tune and by a resumed run (None: the teacher
    runs live, or no distillation). Call it after the run folder is claimed: it may write there."""
    if not options.distill:
        return None
    r = prepared
    return teacher_outputs(r.base, r.data, r.out / TEACHER_OUTPUTS, r.device, base_id=r.base_id, quiet=options.quiet)


def extra_settings(o: SearchOptions) -> dict[str, Any]:
    """The optional fine-tune modes, as stored with the study (absent when off, so older studies resume).

    Called before :func:`distillation` decides (``distill=None``), it checks the numbers a default
    distillation would use, so a bad ``--temperature`` is refused before any work.
    """
    extra: dict[str, Any] = {}
    if o.distill is not False:
        Distill(nn.Identity(), o.distill_weight, o.temperature)  # validates the numbers
    if o.distill:
        extra["distill"] = {"weight": float(o.distill_weight), "temperature": float(o.temperature)}
    if o.soft_epochs:
        extra["soft_epochs"] = float(o.soft_epochs)
    return extra


def find_groups(model: nn.Module, example: Any, space: SearchSpace, data: Data, batch_size: int,
                seed: int, base_model: str = "", importance: str | None = None,
                device: torch.device | None = None) -> ChannelGroups:
    """The model's groups under ``space`` (its layer patterns checked against the model)."""
    space.check_layers(model)
    importance = importance or space.importance
    batches = None
    if criterion(importance).needs_gradients:  # a few training batches give the gradients
        batches = itertools.islice(data.loader("train", batch_size, shuffle=True, seed=seed), 4)
    thinet = importance == "thinet"  # ranks from activations, after the groups are found
    groups = ChannelGroups(model, example, importance="l1" if thinet else importance,
                           ignore=(*space.ignore, *data.task.keep), base_model=base_model, batches=batches,
                           loss=data.task.batch_loss)
    if thinet:
        rerank(groups, model, data.loader("train", batch_size, shuffle=True, seed=seed),
               device or torch.device("cpu"), seed=seed, task=data.task)
    return groups


def budget_limits(groups: ChannelGroups, budget: Budget | BudgetRange, space: SearchSpace,
                  meter: Meter | None = None) -> tuple[CostModel, Cost]:
    """The cost predictor and the budget's absolute caps (a range's upper end); refuses a budget out of
    reach (a range whose lower end is).

    Under a latency cap, with ``meter``, the predictor predicts latency too (its table
    measured here once per machine and setting); without one (before the base is trained)
    only the other caps are checked, and the latency cap once there is a base to time.
    """
    if not len(groups):
        raise AutopruneError("the model has no prunable channel group; nothing to search")
    space.check_groups(groups.ids)
    costs = CostModel(groups)
    if budget.latency is not None and meter is not None:
        costs = latency_costs(groups, costs, meter, space.round_to)
    limits = budget.limits(costs.base)
    tightest = budget.low.limits(costs.base) if isinstance(budget, BudgetRange) else limits
    if meter is None and budget.latency is not None:  # no base timed yet: its latency cap waits for one
        tightest = replace(tightest, latency=math.inf)
    else:
        check_prunes(budget, limits, costs.base)
    check_reachable(costs, tightest, space.ratio_bounds(groups.ids)[1], space.round_to)
    return costs, limits


def refuse_before_training(space: SearchSpace, budget: Budget | BudgetRange,
                           options: SearchOptions) -> Callable[[nn.Module, Data], None]:
    """A ``before_training`` for :func:`prepare`: a bad space or budget is refused before the base trains."""
    def refuse(base: nn.Module, data: Data) -> None:
        groups = find_groups(base, data.example_input(), space, data, options.batch_size, options.seed,
                             importance="l1")
        budget_limits(groups, budget, space)

    return refuse


@dataclass(frozen=True)
class BaseScore:
    """The unpruned model's scores, which every candidate is measured against."""

    val: float  # on the validation split
    score: float  # on the scoring split (the scan's and the trials' cheap scores): val where it is no smaller
    per_image: float  # seconds to score one validation image, for planning a time budget


def score_base(base: nn.Module, data: Data, device: torch.device) -> BaseScore:
    """Score the base model on validation (timed) and on the scoring split."""
    clock = time.perf_counter()
    val = evaluate(base, data.loader("val", 256), device, data.task)
    per_image = (time.perf_counter() - clock) / len(data.val)
    score = evaluate(base, data.loader("score", 256), device, data.task) if len(data.score) < len(data.val) else val
    return BaseScore(val, score, per_image)


def base_line(run: Prepared, val: float, costs: CostModel, groups: ChannelGroups, budget: Budget | BudgetRange,
              limits: Cost) -> str:
    """The line a search starts with: the base model's score and cost, its groups, the budget's caps."""
    caps = ", ".join(f"≤ {human(cap)} {what}" for cap, what in
                     ((limits.flops, "FLOPs"), (limits.params, "params")) if cap < float("inf"))
    caps += f"{', ' if caps else ''}≤ {limits.latency:.3g} ms" if limits.latency < float("inf") else ""
    data = run.data
    return (f"base {run.name} on {data.name}: val {data.task.name} {data.task.show(val)} | {costs.base} | "
            f"{len(groups)} groups | budget {budget}: {caps}")


def range_targets(budget: Budget | BudgetRange, costs: CostModel) -> list[tuple[str, Cost]]:
    """A range budget's :data:`~autoprune.cost.budget.STRATA` targets (name, caps), tightest first; none
    for one budget."""
    if not isinstance(budget, BudgetRange):
        return []
    return [(str(b), b.limits(costs.base)) for b in budget.targets(STRATA)]


def bounded_problem(base: nn.Module, data: Data, groups: ChannelGroups, costs: CostModel, table: pd.DataFrame,
                    space: SearchSpace, limits: Cost, base_val: float, device: torch.device,
                    targets: Sequence[tuple[str, Cost]] = (), **extra: Any) -> Problem:
    """The search stage's problem: per-group ratio bounds from the sensitivity ``table`` and the
    seed plan that spends the budget for an equal accuracy drop everywhere.

    ``targets`` (name, caps) are a range's strata, tightest first: the bounds serve the tightest,
    each stratum gets its own seed, and the range's seed is the loosest's. ``extra`` goes to
    :class:`~autoprune.study.trials.Problem` (checkpoints, meter).
    """
    low, ceiling = space.ratio_bounds(groups.ids)
    tightest = targets[0][1] if targets else limits  # one scan serves every target: bound for the tightest
    high = np.maximum(low, bounds(table, costs, tightest, ceiling, round_to=space.round_to))
    strata = [Stratum(label, caps, equal_drop(table, costs, caps, low, high, space.round_to))
              for label, caps in targets]
    seed = strata[-1].seed if strata else equal_drop(table, costs, limits, low, high, space.round_to)
    return Problem(base, data, groups, costs, limits, low, high, seed, base_val, device, space.round_to,
                   strata=strata, **extra)
