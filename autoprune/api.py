"""The Python API: ``search`` a model for a budget, ``load_pruned`` what it wrote.

The CLI is a thin layer over these two functions.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .budget import Budget, check_reachable, steps
from .costmodel import CostModel
from .counting import Cost, human
from .data import Data, load_data
from .errors import AutopruneError
from .export import export
from .files import command_line, fingerprint, save_torch, versions, write_json, write_text
from .groups import ChannelGroups, apply_plan
from .importance import criterion
from .models import build_model, load_weights, read_state_dict
from .plan import Plan
from .sensitivity import bounds, equal_drop, scan
from .space import SearchSpace, resolve
from .study import Problem, Settings, best_trial, config_dict, open_study, run, trial_plan, trials_table
from .training import evaluate, resolve_device, train

DEFAULT_TRAIN_EPOCHS = 15.0


@dataclass
class Result:
    """What a search hands back: the pruned model, its plan, the summary and the study."""

    model: nn.Module
    plan: Plan
    summary: dict[str, Any]
    study: optuna.Study
    out: Path


def _as_data(data: Data | str | Sequence[Dataset | DataLoader], **options: Any) -> Data:
    if isinstance(data, Data):
        return data
    if isinstance(data, (str, Path)):
        return load_data(str(data), **options)
    if isinstance(data, (tuple, list)) and len(data) == 3:
        train_set, val_set, test_set = (d.dataset if isinstance(d, DataLoader) else d for d in data)
        sample, _ = train_set[0]
        labels = {int(train_set[i][1]) for i in range(min(len(train_set), 20000))}
        num_classes = getattr(train_set, "num_classes", max(labels) + 1)
        return Data("user", train_set, val_set, test_set, int(num_classes), tuple(sample.shape))
    raise AutopruneError("data must be a data set name, a Data, or (train, val, test) datasets or loaders")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text.replace("=", "").replace(",", "-"))


def _base_model(model: nn.Module | str, weights: str | None, data: Data, out: Path,
                train_epochs: float | None) -> tuple[nn.Module, float]:
    """The base model with its weights, and how many epochs it still has to be trained."""
    if isinstance(model, nn.Module):
        if weights:
            load_weights(model, weights)
        return model, train_epochs or 0.0
    saved = out / "base.pt"
    if weights in (None, "DEFAULT") and saved.is_file():  # trained by an earlier run
        return load_weights(build_model(model, data.num_classes), saved), 0.0
    built = build_model(model, data.num_classes, pretrained=weights == "DEFAULT")
    if weights and weights != "DEFAULT":
        return load_weights(built, weights), train_epochs or 0.0
    if train_epochs is not None:
        return built, train_epochs
    head_only = weights == "DEFAULT" and data.num_classes == 1000
    return built, 0.0 if head_only else DEFAULT_TRAIN_EPOCHS


def search(
    model: nn.Module | str,
    data: Data | str | Sequence[Dataset | DataLoader],
    budget: str | Budget = "flops=0.3",
    *,
    weights: str | None = None,
    trials: int = 12,
    study: str | None = None,
    storage: str | None = None,
    out: str | Path | None = None,
    new_study: bool = False,
    train_epochs: float | None = None,
    finetune_epochs: float = 1.0,
    final_epochs: float = 5.0,
    lr: float = 0.01,
    batch_size: int = 64,
    space: SearchSpace | str | Path | None = None,
    grid: Sequence[float] | None = None,
    max_ratio: float | None = None,
    importance: str | None = None,
    round_to: int | None = None,
    bn_batches: int = 8,
    device: str = "auto",
    seed: int = 0,
    quiet: bool = False,
    data_dir: str | Path = "data",
    download: bool = False,
) -> Result:
    """Find per-group pruning ratios that meet ``budget`` and keep the most accuracy.

    ``model`` is a trained ``nn.Module`` or a model name (torchvision name,
    ``package.module:factory``, ``file.py:factory``); a named model without
    ``weights`` is trained first (``train_epochs``) and kept in the run directory.
    ``data`` is a data set name or ``(train, val, test)`` datasets or loaders.
    Running it again resumes the study; ``trials`` is the total to reach.
    ``space`` is a :class:`SearchSpace`, a YAML file or a shipped space name;
    by default the one shipped for the architecture. ``grid``, ``max_ratio``,
    ``importance`` and ``round_to`` override the space's values.

    Example:
        >>> result = autoprune.search("resnet18", "digits", "flops=0.25", trials=12)
        >>> result.summary["flops_share"] <= 0.25
        True
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    if trials < 1:
        raise AutopruneError(f"--trials must be at least 1, not {trials}")
    space = resolve(space, model).replace(grid=tuple(grid) if grid else None, max_ratio=max_ratio,
                                          importance=importance, round_to=round_to)
    data = _as_data(data, data_dir=data_dir, download=download, seed=seed)
    name = model if isinstance(model, str) else type(model).__name__
    study_name = study or f"{_slug(Path(name).stem)}-{_slug(data.name)}-{_slug(str(budget))}"
    out = Path(out) if out else Path("results") / study_name
    storage = storage or f"sqlite:///{out / 'study.db'}"
    device = resolve_device(device)
    settings = Settings(trials, finetune_epochs, final_epochs, lr, batch_size, bn_batches, seed)
    example = data.example_input()
    base, epochs = _base_model(model, weights, data, out, train_epochs)
    if epochs > 0:  # refuse a bad space or budget before training
        _budget_limits(_groups(base, example, space, data, batch_size, seed, importance="l1"), budget, space)
        torch.manual_seed(seed)
        train(base, data.loader("train", batch_size, shuffle=True, seed=seed), epochs, device, lr=0.05,
              desc="train base", quiet=quiet)
        save_torch(base.state_dict(), out / "base.pt")
    base = base.to(device).eval()
    base_id = fingerprint(base.state_dict())
    groups = _groups(base, example, space, data, batch_size, seed, base_model=base_id)
    costs, limits = _budget_limits(groups, budget, space)
    config = config_dict(model=name, base_model=base_id, dataset=data.name, budget=str(budget),
                         importance=space.importance, grid=[float(r) for r in space.grid],
                         max_ratio=space.max_ratio, space=space.to_dict(),
                         finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size,
                         bn_batches=bn_batches, seed=seed)
    the_study = open_study(study_name, storage, config, new=new_study)
    if not (out / "base.pt").is_file():
        save_torch(base.state_dict(), out / "base.pt")
    base_val = evaluate(base, data.loader("val", 256), device)
    if not quiet:
        caps = ", ".join(f"≤ {human(cap)} {what}" for cap, what in
                         ((limits.flops, "FLOPs"), (limits.params, "params")) if cap < float("inf"))
        print(f"base {name} on {data.name}: val {base_val:.2%} | {costs.base} | {len(groups)} groups | "
              f"budget {budget}: {caps}")
    table = scan(groups, costs, base, data, base_val, device, out / "sensitivity.csv", space.grid,
                 bn_batches, batch_size, quiet, space.round_to)
    low, ceiling = space.ratio_bounds(groups.ids)
    high = np.maximum(low, bounds(table, costs, limits, ceiling, round_to=space.round_to))
    problem = Problem(base, data, groups, costs, limits, low, high,
                      equal_drop(table, costs, limits, low, high, space.round_to), base_val, device,
                      space.round_to)
    run(problem, the_study, settings, quiet)
    chosen = best_trial(the_study)
    meta = {"model": name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "dataset": data.name, "study": study_name, "trial": chosen.number}
    found = trial_plan(chosen)
    plan = Plan(found.kept, found.channels, found.importance, found.base_model, meta)
    write_text(out / "trials.csv", trials_table(the_study).to_csv(index=False))
    record = dict(budget=str(budget), budget_flops=limits.flops, budget_params=limits.params,
                  trial=chosen.number, trial_val_accuracy=chosen.value, trials=len(the_study.trials),
                  final_epochs=final_epochs, model=name, base_model=base_id, dataset=data.name,
                  study=study_name, storage=storage, device=str(device), input_shape=list(data.input_shape))
    summary = _export_once(problem, plan, out, settings, quiet, record)
    summary.update(seconds=round(time.perf_counter() - started, 1), command=command_line(), versions=versions())
    write_json(out / "summary.json", summary)
    pruned = torch.load(out / "model.pt", weights_only=False)
    return Result(pruned, plan, summary, the_study, out)


def _groups(model: nn.Module, example: torch.Tensor, space: SearchSpace, data: Data, batch_size: int,
            seed: int, base_model: str = "", importance: str | None = None) -> ChannelGroups:
    """The model's groups under ``space`` (its layer patterns checked against the model)."""
    space.check_layers(model)
    importance = importance or space.importance
    batches = None
    if criterion(importance).needs_gradients:  # a few training batches give the gradients
        batches = itertools.islice(data.loader("train", batch_size, shuffle=True, seed=seed), 4)
    return ChannelGroups(model, example, importance=importance, ignore=space.ignore,
                         base_model=base_model, batches=batches)


def _budget_limits(groups: ChannelGroups, budget: Budget, space: SearchSpace) -> tuple[CostModel, Cost]:
    """The cost predictor and the budget's absolute caps; refuses a budget out of reach."""
    if not len(groups):
        raise AutopruneError("the model has no prunable channel group; nothing to search")
    space.check_groups(groups.ids)
    costs = CostModel(groups)
    limits = budget.limits(costs.base)
    check_reachable(costs, limits, space.ratio_bounds(groups.ids)[1], space.round_to)
    return costs, limits


EXPORT_KEYS = ("study", "trial", "base_model", "final_epochs")


def _export_once(problem: Problem, plan: Plan, out: Path, settings: Settings, quiet: bool,
                 record: dict[str, Any]) -> dict[str, Any]:
    """Export the chosen trial, unless this run directory already holds exactly that export."""
    previous = out / "summary.json"
    files = [out / f for f in ("model.pt", "weights.pt", "plan.json")]
    if previous.is_file() and all(f.is_file() for f in files):
        summary = json.loads(previous.read_text())
        if all(summary.get(k) == record.get(k) for k in EXPORT_KEYS):
            return {**summary, **record}
    return export(problem, plan, out, settings, quiet, **record)


def load_pruned(
    plan: str | Path | Plan,
    model: nn.Module | str | None = None,
    weights: str | Path | None = "auto",
) -> nn.Module:
    """Rebuild a pruned model from its plan, without unpickling any code.

    ``plan`` is a run directory, a ``plan.json`` or a :class:`Plan`; ``model`` the
    base model (an ``nn.Module`` or a model name; by default the one the plan
    records). ``weights="auto"`` loads the fine-tuned ``weights.pt`` beside the
    plan; ``None`` keeps the base model's own weights, which must be those the
    plan was made from.

    Example:
        >>> pruned = autoprune.load_pruned("results/resnet18-digits-flops0.25")
    """
    folder = None
    if not isinstance(plan, Plan):
        path = Path(plan)
        folder = path if path.is_dir() else path.parent
        plan = Plan.load(path / "plan.json" if path.is_dir() else path)
    meta = plan.meta
    if model is None or isinstance(model, str):
        spec = model or meta.get("model")
        if not spec or "num_classes" not in meta:
            raise AutopruneError("the plan does not record its model; pass the base model as model=")
        model = build_model(spec, int(meta["num_classes"]))
    if weights == "auto":
        weights = folder / "weights.pt" if folder and (folder / "weights.pt").is_file() else None
    if weights is None and plan.base_model and fingerprint(model.state_dict()) != plan.base_model:
        raise AutopruneError("the model's weights are not the base weights this plan was made from; "
                             "load the base weights first or pass weights= for the pruned model")
    shape = meta.get("input_shape")
    if not shape:
        raise AutopruneError("the plan does not record its input shape; it was not written by autoprune")
    pruned = apply_plan(model, plan, torch.zeros(1, *shape))
    if weights is not None:
        pruned.load_state_dict(read_state_dict(weights))
    return pruned.eval()


def describe_groups(
    model: nn.Module | str,
    data: Data | str | Sequence[Dataset | DataLoader] = "digits",
    space: SearchSpace | str | Path | None = None,
    importance: str | None = None,
    data_dir: str | Path = "data",
    download: bool = False,
) -> str:
    """A table of the prunable groups a search space is written against.

    One row per group: its id (what ``bounds`` patterns match), channels, the
    channel step it moves in (``round_to`` and its blocks), its share of the FLOPs (what pruning it to one
    block saves) and its layers.

    Example:
        >>> print(autoprune.api.describe_groups("resnet18"))
        resnet18 on digits (1, 3, 32, 32): 37.2M FLOPs (thop MACs), 11.2M params | space resnet …
    """
    data = _as_data(data, data_dir=data_dir, download=download)
    space = resolve(space, model).replace(importance=importance)
    base = build_model(model, data.num_classes) if isinstance(model, str) else model
    base = base.eval()
    example = data.example_input()
    space.check_layers(base)
    groups = ChannelGroups(base, example, importance="l1", ignore=space.ignore)
    space.check_groups(groups.ids)
    costs = CostModel(groups)
    low, high = space.ratio_bounds(groups.ids)
    step = steps(costs, space.round_to).astype(int)
    name = model if isinstance(model, str) else type(model).__name__
    lines = [f"{name} on {data.name} {tuple(example.shape)}: {costs.base} | space {space.name} "
             f"({space.source or 'given'}) | {len(groups)} prunable groups",
             f"{'group':40s} {'channels':>8s} {'step':>4s} {'FLOPs share':>11s} {'ratio bounds':>12s}  layers"]
    for group, lo, hi, by in zip(groups, low, high, step):
        saved = costs.base.flops - costs.predict({group.id: group.unit}).flops
        layers = ", ".join(group.layers[:3]) + (f" (+{len(group.layers) - 3} more)" if len(group.layers) > 3 else "")
        lines.append(f"{group.id:40s} {group.channels:8d} {by:4d} {saved / costs.base.flops:11.1%} "
                     f"{f'{lo:.2f}–{hi:.2f}':>12s}  {layers}")
    return "\n".join(lines)
