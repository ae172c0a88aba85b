"""The MLP experiment: uniform per-layer weight pruning from 10 % to 60 %, then the search at the same budgets.

For each level every layer loses the same share of its smallest weights; the
table gives test accuracy before pruning, right after it, and after a short
fine-tune with the masks held. Then, at the same nonzero-params budget, the
weight-level search (per-layer sparsities, sensitivity-seeded, the same
fine-tune per trial and for the winner) shows what choosing sparsities per
layer adds over pruning every layer alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import optuna
import torch

from autoprune.errors import AutopruneError
from autoprune.inputs.data import Data, load_data
from autoprune.inputs.models import build_model
from autoprune.options import BASE_LR, FINETUNE_LR
from autoprune.study.trials import Settings
from autoprune.study.weights import (LABEL, WeightCosts, WeightProblem, count_nonzero, equal_drop_sparsities,
                                            finetune_sparse, run_trials, scan_sparsities)
from autoprune.train.loop import evaluate, resolve_device, train

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass
class SweepRow:
    """One pruning level: uniform pruning before and after fine-tuning, and the search's result."""

    level: float
    nonzero_share: float
    base: float
    pruned: float
    uniform: float
    searched: float
    search_nonzero_share: float

    @property
    def drop(self) -> float:
        return self.pruned - self.base


def mlp_sweep(data: Data | str = "digits", levels: Sequence[float] = LEVELS, train_epochs: float = 10.0,
              finetune_epochs: float = 1.0, trials: int = 6, lr: float = FINETUNE_LR, batch_size: int = 64,
              device: str = "auto", seed: int = 0, quiet: bool = False, data_dir: str = "data",
              download: bool = False, report: Callable[[SweepRow], None] | None = None) -> list[SweepRow]:
    """Run the MLP experiment; accuracies are on the test split (the search itself scores on validation).

    ``report`` is called with each row as soon as it is measured.

    Example:
        >>> rows = mlp_sweep("digits", levels=(0.3,), trials=4)
        >>> rows[0].searched >= 0
        True
    """
    if not levels or not all(0 < lvl < 1 for lvl in levels):
        raise AutopruneError("levels must lie strictly between 0 and 1, e.g. 0.1,0.2,0.3")
    if trials < 1:
        raise AutopruneError(f"--trials must be at least 1, not {trials}")
    data = data if isinstance(data, Data) else load_data(data, data_dir, download, seed=seed)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    base = build_model("mlp", data.num_classes, input_shape=data.input_shape)
    train(base, data.loader("train", batch_size, shuffle=True, seed=seed), train_epochs, dev, lr=BASE_LR,
          desc="train mlp", quiet=quiet, task=data.task)
    costs = WeightCosts.of(base)
    val_acc = evaluate(base, data.loader("val", 256), dev, data.task)
    test_loader = data.loader("test", 256)
    base_test = evaluate(base, test_loader, dev, data.task)
    settings = Settings(trials, finetune_epochs, finetune_epochs, lr, batch_size, 8, seed)
    table = scan_sparsities(base, costs, data, val_acc, dev, None, quiet=quiet)
    rows = []
    for level in levels:
        uniform = np.full(len(costs.names), level)
        limit = costs.nonzero(uniform)
        high = max(0.95, 1 - (1 - level) / 2)  # a layer may go twice as sparse as the uniform level
        seeded = equal_drop_sparsities(table, costs, limit, high)
        problem = WeightProblem(base, data, costs, limit, high, seeded, val_acc, dev)
        pruned_model, _, _ = finetune_sparse(problem, uniform, settings, 0, seed, True, "")
        pruned = evaluate(pruned_model, test_loader, dev, data.task)
        tuned, _, _ = finetune_sparse(problem, uniform, settings, finetune_epochs, seed, quiet,
                                      f"uniform {level:.0%}")
        study = optuna.create_study(direction="maximize")
        run_trials(problem, study, settings, quiet=True)
        chosen = np.array([study.best_trial.user_attrs["sparsities"][n] for n in costs.names])
        searched, _, _ = finetune_sparse(problem, chosen, settings, finetune_epochs, seed, quiet,
                                         f"search {level:.0%}")
        rows.append(SweepRow(level, count_nonzero(tuned) / costs.base, base_test, pruned,
                             evaluate(tuned, test_loader, dev, data.task), evaluate(searched, test_loader, dev, data.task),
                             count_nonzero(searched) / costs.base))
        if report is not None:
            report(rows[-1])
    return rows


HEADER = ("level | nonzero share* | base | uniform, no fine-tune | diff | uniform + fine-tune | "
          "search + fine-tune (nonzero share*) | search − uniform")


def format_row(row: SweepRow) -> str:
    return (f"{row.level:5.0%} | {row.nonzero_share:14.1%} | {row.base:.2%} | {row.pruned:21.2%} | "
            f"{row.drop * 100:+5.2f} | {row.uniform:19.2%} | {row.searched:.2%} ({row.search_nonzero_share:.1%}) "
            f"| {(row.searched - row.uniform) * 100:+.2f}")


def as_dicts(rows: Sequence[SweepRow]) -> list[dict]:
    return [{**asdict(r), "drop": r.drop} for r in rows]


FOOTNOTE = f"* {LABEL}; accuracies on the test split; diff in points"
__all__ = ["mlp_sweep", "SweepRow", "HEADER", "FOOTNOTE", "format_row", "as_dicts", "LEVELS"]
