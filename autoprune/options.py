"""What a search can be told besides its model, data and budget, with every default spelled once.

:class:`SearchOptions` is the one settings object: :func:`autoprune.search` takes it
(or its fields as keywords), the CLI's ``search`` flags are its fields with their
defaults, and export and the benchmark read their defaults here. This module
imports nothing heavy, so ``autoprune --help`` can show the defaults without loading torch.

Example:
    >>> fast = SearchOptions(trials=24, finetune_epochs=0.5, final_epochs=3)
    >>> result = autoprune.search("resnet18", "digits", "flops=0.25", fast)
    >>> result = autoprune.search("resnet18", "digits", "flops=0.25", fast, seed=1)  # keywords override
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from autoprune.errors import AutopruneError

if TYPE_CHECKING:
    from autoprune.cost.latency import Timer
    from autoprune.inputs.task import Task
    from autoprune.study.space import SearchSpace

FINETUNE_LR = 0.01  # SGD learning rate of every fine-tune of a pruned model (trials, final, bench)
BASE_LR = 0.05  # SGD learning rate for training a base model from scratch
BASE_EPOCHS = 15.0  # a base model trained here, when no --weights and no --train-epochs


@dataclass(frozen=True)
class SearchOptions:
    """Every knob of :func:`autoprune.search` but the model, data and budget, with its default.

    The CLI flag of a field is its name with dashes (``finetune_epochs`` is ``--finetune-epochs``).
    """

    # The base model: trained weights (a file, or "DEFAULT" for torchvision's pretrained ones);
    # without them a named model is trained first, ``train_epochs`` (default BASE_EPOCHS) at ``base_lr``.
    weights: str | None = None
    train_epochs: float | None = None
    base_lr: float = BASE_LR
    # The data set's folder for torchvision data sets, and whether to download it there.
    data_dir: str | Path = "data"
    download: bool = False
    # What the model is trained and judged on: an autoprune.Task, or package.module:name /
    # file.py:name of a factory returning one (default: classification, scored by accuracy).
    task: Task | str | None = None
    # The study: its name (default MODEL-DATASET-BUDGET), Optuna storage URL (default: SQLite in the
    # run folder, a journal file with several workers), run folder (default results/STUDY), a fresh start.
    study: str | None = None
    storage: str | None = None
    out: str | Path | None = None
    new_study: bool = False
    # The search: trials the study reaches (pruned ones count), worker processes on this machine,
    # "median" stops candidates below the median part-way (None: median; "none": never),
    # a wall-time budget ("30m") that plans scan, successive halving and final fine-tune to end on time,
    # "channel" pruning or per-layer "weight" sparsity under a nonzero-params budget.
    trials: int = 12
    workers: int = 1
    pruner: str | None = None
    time_budget: str | float | None = None
    granularity: str = "channel"
    # The search space (a SearchSpace, YAML file or shipped name; default: the architecture's) and
    # overrides of its sensitivity grid, largest ratio, channel importance and channel rounding.
    space: SearchSpace | str | Path | None = None
    grid: Sequence[float] | None = None
    max_ratio: float | None = None
    importance: str | None = None
    round_to: int | None = None
    # Fine-tuning: epochs per trial and for the winner, learning rate, batch size, batches that
    # recalibrate BatchNorm before a candidate is scored.
    finetune_epochs: float = 1.0
    final_epochs: float = 5.0
    lr: float = FINETUNE_LR
    batch_size: int = 64
    bn_batches: int = 8
    # Knowledge distillation from the unpruned model (share of the KD term, softmax temperature),
    # and soft pruning of the winner for this many epochs before its channels are cut.
    distill: bool = False
    distill_weight: float = 0.5
    temperature: float = 4.0
    soft_epochs: float = 0.0
    # What a latency is (for latency= budgets, and recorded for every trial): "torch" (eager, on
    # ``device``) or "onnxruntime" (CPU), the batch and intra-op threads it is timed with;
    # ``latency_timer`` replaces the wall clock (tests inject a fake one).
    latency_backend: str = "torch"
    latency_batch: int = 1
    latency_threads: int = 1
    latency_timer: Timer | None = None
    # "auto" (CUDA where there is one), "cpu", "cuda:N"; the seed of everything random; no progress output.
    device: str = "auto"
    seed: int = 0
    quiet: bool = False

    def replace(self, **changes: Any) -> SearchOptions:
        """These options with ``changes``; an unknown name is refused, naming the known ones."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown search option {unknown[0]!r}; known: {', '.join(OPTION_NAMES)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SearchOptions:
        """The options the CLI's parsed ``search`` flags give (flags are fields with dashes)."""
        return cls(**{name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)})

    def check(self) -> None:
        """Refuse any number no search can run with, each blamed on its own flag, before anything is written
        (the latency settings check their own: :class:`autoprune.cost.latency.LatencySettings`)."""
        if self.granularity not in ("channel", "weight"):
            raise AutopruneError(f"unknown granularity {self.granularity!r}; use channel or weight")
        for flag, value, least in (("--trials", self.trials, 1), ("--workers", self.workers, 1),
                                   ("--batch-size", self.batch_size, 1), ("--bn-batches", self.bn_batches, 1),
                                   ("--round-to", 1 if self.round_to is None else self.round_to, 1)):
            if value < least:
                raise AutopruneError(f"{flag} must be at least {least}, not {value}")
        for flag, value in (("--lr", self.lr), ("--base-lr", self.base_lr)):
            if not (math.isfinite(value) and value > 0):
                raise AutopruneError(f"{flag} must be a positive number, not {value:g}")
        for flag, value in (("--finetune-epochs", self.finetune_epochs), ("--final-epochs", self.final_epochs),
                            ("--train-epochs", self.train_epochs or 0.0), ("--soft-epochs", self.soft_epochs)):
            if not (math.isfinite(value) and value >= 0):
                raise AutopruneError(f"{flag} must be a number of epochs, 0 or more, not {value:g}")
        grid, top = self.grid, self.max_ratio
        for flag, ratios in (("--grid", grid or ()), ("--max-ratio", () if top is None else (top,))):
            bad = [r for r in ratios if not 0 < r < 1]
            if bad:
                raise AutopruneError(f"{flag} takes ratios strictly between 0 and 1 (e.g. 0.1,0.5,0.9), "
                                     f"not {bad[0]:g}")
        if grid is not None and not grid:
            raise AutopruneError("--grid needs at least one ratio, e.g. 0.1,0.5,0.9")


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SearchOptions))
DEFAULTS = SearchOptions()
