"""What a search (or an export) can be told besides its model, data and budget (or study), with every
default spelled once.

:class:`SearchOptions` is the one settings object of a search: :func:`autoprune.search` takes it
(or its fields as keywords), the CLI's ``search`` flags are its fields with their
defaults, and the benchmark reads its defaults here. :class:`ExportOptions` is the same for
:func:`autoprune.export_trial` and ``autoprune export``. This module imports nothing heavy, so
``autoprune --help`` can show the defaults without loading torch.

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
    # a wall-time budget ("30m") that plans scan, successive halving and final fine-tune to end on time
    # (racing candidates under 10m, or as ``race`` says),
    # "channel" pruning or per-layer "weight" sparsity under a nonzero-params budget.
    trials: int = 12
    workers: int = 1
    pruner: str | None = None
    time_budget: str | float | None = None
    race: bool | None = None
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
    # Knowledge distillation from the unpruned model (None: a classifier whose outputs can be cached
    # distills, a resumed study as it was made; share of the KD term, softmax temperature),
    # and soft pruning of the winner for this many epochs before its channels are cut.
    distill: bool | None = None
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
        return _replace(self, "search", changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SearchOptions:
        """The options the CLI's parsed ``search`` flags give (flags are fields with dashes)."""
        return cls(**{name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)})

    def check(self) -> None:
        """Refuse any number no search can run with, each blamed on its own flag, before anything is written
        (the latency settings check their own: :class:`autoprune.cost.latency.LatencySettings`)."""
        if self.race is not None and self.time_budget is None:
            raise AutopruneError("--race and --no-race choose how a --time-budget search spends its time; "
                                 "give --time-budget too, or leave them out")
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


FORMATS = ("onnx", "torchscript")  # what export writes besides model.pt (autoprune.export.formats)


@dataclass(frozen=True)
class ExportOptions:
    """Every knob of :func:`autoprune.export_trial` but the study, with its default.

    The CLI's ``export`` flag of a field is its name with dashes, but for ``at`` (``--flops``,
    ``--params``), ``formats`` (``--format``), ``latency_batches`` (``--latency-batch``, the one
    besides batch 1) and ``threads`` (``--latency-threads``).

    Example:
        >>> autoprune.export_trial("resnet18-digits-flops0.25", ExportOptions(formats=("onnx",)), repeats=5)
    """

    # Which trial: its number (default: the best), or the most accurate at or under a point
    # ("flops=0.2", "params=1M"): on a range study, any point of the trade-off.
    trial: int | None = None
    at: str | None = None
    # Where the study is: its Optuna storage (default: the run folder's) and run folder (default: the
    # folder the study recorded, else results/STUDY); where the export goes (default: RUN_DIR/trial-N).
    storage: str | None = None
    run_dir: str | Path | None = None
    out: str | Path | None = None
    # The final fine-tune's epochs, as the search's.
    final_epochs: float = SearchOptions.final_epochs
    # Deployment copies ("onnx", "torchscript"), each checked against PyTorch, and an int8 copy ("dynamic").
    formats: Sequence[str] = ()
    quantize: str | None = None
    # The CPU latency table: batch sizes, timed runs per latency (the median) and intra-op threads.
    latency_batches: Sequence[int] = (1, 32)
    repeats: int = 30
    threads: int = 1
    # The data as for search; the device of the fine-tune; no progress bars; the search's task
    # where it was given as an object (a --task file is found from the study).
    data_dir: str | Path = SearchOptions.data_dir
    download: bool = False
    device: str = SearchOptions.device
    quiet: bool = False
    task: Task | str | None = None

    def replace(self, **changes: Any) -> ExportOptions:
        """These options with ``changes``; an unknown name is refused, naming the known ones."""
        return _replace(self, "export", changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportOptions:
        """The options the CLI's parsed ``export`` flags give."""
        at = ",".join(f"{key}={value}" for key, value in (("flops", args.flops), ("params", args.params)) if value)
        same = {name: getattr(args, name) for name in EXPORT_NAMES if hasattr(args, name)}
        return cls(**same, at=at or None, formats=args.format, latency_batches=(1, args.latency_batch),
                   threads=args.latency_threads)

    def check(self) -> None:
        """Refuse a format, quantization or latency setting no export can use, before anything is read."""
        unknown = set(self.formats) - set(FORMATS)
        if unknown:
            raise AutopruneError(f"unknown format {sorted(unknown)[0]!r}; choose from {', '.join(FORMATS)}")
        if self.quantize not in (None, "dynamic"):
            raise AutopruneError(f"unknown quantization {self.quantize!r}; the one supported is 'dynamic' (int8)")
        if self.repeats < 1 or self.threads < 1 or not self.latency_batches or min(self.latency_batches) < 1:
            raise AutopruneError("latency needs at least one repeat, one thread and batch sizes of at least 1")


EXPORT_NAMES = tuple(f.name for f in dataclasses.fields(ExportOptions))
EXPORT_DEFAULTS = ExportOptions()


def _replace(options: Any, what: str, changes: dict[str, Any]) -> Any:
    names = [f.name for f in dataclasses.fields(options)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise TypeError(f"unknown {what} option {unknown[0]!r}; known: {', '.join(names)}")
    return dataclasses.replace(options, **changes)
