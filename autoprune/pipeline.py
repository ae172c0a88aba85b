"""The first stages every search shares, channel or weight, and the benchmark: the data, the run
folder and its storage, the base model and its training.

A search is then: groups (:mod:`autoprune.groups`) → sensitivity (:mod:`autoprune.sensitivity`) →
search (:mod:`autoprune.study`, :mod:`autoprune.halving`) → export (:mod:`autoprune.export`);
:func:`autoprune.api.search` and :func:`autoprune.unstructured.search_weights` run them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import Data, from_splits, load_data
from .defaults import BASE_LR
from .errors import AutopruneError
from .files import save_torch
from .models import build_model, load_weights
from .plan import Plan
from .training import evaluate, train

DEFAULT_TRAIN_EPOCHS = 15.0  # a base model trained here, when no --weights and no --train-epochs


@dataclass
class Result:
    """What a search hands back: the pruned model, its plan, the summary and the study."""

    model: nn.Module
    plan: Plan
    summary: dict[str, Any]
    study: optuna.Study
    out: Path


def as_data(data: Data | str | Sequence[Dataset | DataLoader], **options: Any) -> Data:
    """``data`` as a :class:`Data`: a data set name or path (``options`` go to :func:`load_data`),
    a Data, or (train, val, test) datasets or loaders."""
    if isinstance(data, Data):
        return data
    if isinstance(data, (str, Path)):
        return load_data(str(data), **options)
    if isinstance(data, (tuple, list)) and len(data) == 3:
        return from_splits("user", *(d.dataset if isinstance(d, DataLoader) else d for d in data))
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
    return built, 0.0 if head_only else DEFAULT_TRAIN_EPOCHS


def train_base(base: nn.Module, data: Data, epochs: float, device: torch.device, batch_size: int, seed: int,
               out: Path, quiet: bool, lr: float = BASE_LR) -> None:
    """Train the base model and keep it as ``out/base.pt``, so the next run of the study reuses it.

    A model that ends near chance on validation is refused and not kept: pruning
    it would measure nothing (vgg11_bn on digits needs a base learning rate of 0.01).
    """
    torch.manual_seed(seed)
    train(base, data.loader("train", batch_size, shuffle=True, seed=seed), epochs, device, lr=lr,
          desc="train base", quiet=quiet)
    accuracy = evaluate(base, data.loader("val", 256), device)
    if accuracy < 2.0 / data.num_classes:
        raise AutopruneError(f"the base model trained to {accuracy:.1%} validation accuracy, near chance "
                             f"({1 / data.num_classes:.0%}); train it with a smaller --base-lr (was {lr:g}) "
                             "or more --train-epochs, or pass trained --weights")
    save_torch(base.state_dict(), out / "base.pt")
