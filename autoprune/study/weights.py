"""Weight-level (unstructured) pruning: per-layer magnitude sparsity under a nonzero-params budget.

Each convolution and linear layer keeps the largest-magnitude share ``1 - s`` of
its weights (the classic per-layer percentile threshold); the search picks ``s``
per layer. Masks are re-applied after every optimiser step, so a pruned weight
is exactly zero throughout fine-tuning and in the exported model.

thop counts dense tensors, so it cannot see this kind of pruning: autoprune
counts nonzero parameters itself and labels them so wherever they appear.
FLOPs are not reduced on dense hardware and are not a budget here.
"""

from __future__ import annotations

import copy
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from autoprune.cost.budget import Budget
from autoprune.counting import Cost, count, human
from autoprune.errors import AutopruneError
from autoprune.files import atomic_path, command_line, save_torch, versions, write_json, write_text
from autoprune.inputs.data import Data
from autoprune.inputs.models import absolute_spec
from autoprune.options import SearchOptions
from autoprune.prune.groups import ROOT_TYPES
from autoprune.prune.plan import Plan
from autoprune.study.checks import claim_run
from autoprune.study.pipeline import Result, distill_outputs, distillation, extra_settings, prepare
from autoprune.study.runs import record_run
from autoprune.study.sensitivity import GRID, curves, ratio_at_drop
from autoprune.study.storage import open_study
from autoprune.study.trials import ENDED, Settings, best_trial, config_dict, finished, trials_table
from autoprune.train.distill import from_settings
from autoprune.train.loop import evaluate, recalibrate_bn, train
from autoprune.train.teacher import TeacherOutputs

LABEL = "nonzero params (counted by autoprune; thop counts dense)"
SPARSE_FORMAT = "autoprune-sparse/1"


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose weights are pruned: every convolution and linear layer."""
    return [name for name, m in model.named_modules() if isinstance(m, ROOT_TYPES) and m.weight.numel() > 1]


def count_nonzero(model: nn.Module) -> int:
    """Nonzero parameters of ``model`` (every parameter tensor, not only pruned layers).

    Example:
        >>> layer = nn.Linear(2, 1, bias=False); layer.weight.data = torch.tensor([[0.0, 3.0]])
        >>> count_nonzero(layer)
        1
    """
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


@dataclass(frozen=True)
class WeightCosts:
    """What per-layer sparsities cost in nonzero params: layer sizes and everything else."""

    names: tuple[str, ...]
    sizes: np.ndarray
    fixed: int  # nonzero parameters outside the pruned weights (biases, norms)

    @classmethod
    def of(cls, model: nn.Module) -> WeightCosts:
        modules = dict(model.named_modules())
        names = tuple(weight_layers(model))
        sizes = np.array([modules[n].weight.numel() for n in names], dtype=float)
        pruned = sum(int(torch.count_nonzero(modules[n].weight.detach())) for n in names)
        return cls(names, sizes, count_nonzero(model) - pruned)

    @property
    def base(self) -> float:
        return float(self.fixed + self.sizes.sum())

    def kept(self, sparsities: np.ndarray) -> np.ndarray:
        """Weights kept per layer (at least one)."""
        return np.clip(np.round(self.sizes * (1.0 - np.asarray(sparsities))), 1, self.sizes)

    def nonzero(self, sparsities: np.ndarray) -> float:
        return float(self.fixed + self.kept(sparsities).sum())


def project_sparsities(costs: WeightCosts, sparsities: np.ndarray, limit: float, high: float) -> np.ndarray:
    """Scale per-layer densities by a common factor so the nonzero count just meets ``limit``.

    Bisection, as :func:`autoprune.cost.budget.project` does for channels; refuses a limit
    that even ``high`` sparsity everywhere cannot meet.

    Example:
        >>> costs = WeightCosts(("a", "b"), np.array([100.0, 100.0]), 0)
        >>> costs.nonzero(project_sparsities(costs, np.array([0.2, 0.6]), 100, 0.95))
        100.0
    """
    least = costs.nonzero(np.full(len(costs.sizes), high))
    if least > limit:
        raise AutopruneError(f"budget cannot be met: the sparsest model allowed ({high:.0%} of every layer's "
                             f"weights zero) has {human(least)} {LABEL} ({least / costs.base:.1%} of base); "
                             f"ask for at least params={math.ceil(1000 * least / costs.base) / 1000:g} "
                             "or raise --max-ratio")
    density = 1.0 - np.clip(sparsities, 0.0, high)

    def at(alpha: float) -> np.ndarray:
        return 1.0 - np.clip(alpha * density, 1.0 - high, 1.0)

    lo, hi = 0.0, 1.0 / max(float(density.min()), 1e-6)
    if costs.nonzero(at(hi)) <= limit:
        return at(hi)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if costs.nonzero(at(mid)) <= limit else (lo, mid)
    return at(lo)


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsities: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Per layer, a mask keeping the largest-magnitude ``1 - s`` of its weights (ties broken by order)."""
    modules = dict(model.named_modules())
    masks = {}
    for name, sparsity in sparsities.items():
        weight = modules[name].weight.detach()
        keep = max(1, int(round(weight.numel() * (1.0 - sparsity))))
        mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[torch.topk(weight.abs().flatten(), keep, sorted=False).indices] = True
        masks[name] = mask.view_as(weight)
    return masks


class MaskHook:
    """Re-applies masks; ``train(..., after_step=MaskHook(masks))`` keeps pruned weights exactly zero."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = masks

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            weight = modules[name].weight
            weight.mul_(mask.to(weight.device))


def prune_weights(model: nn.Module, sparsities: Mapping[str, float]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with each named layer's smallest weights set to zero, and the masks.

    Example:
        >>> pruned, masks = prune_weights(model, {"1": 0.5})
        >>> float((pruned[1].weight == 0).float().mean())
        0.5
    """
    pruned = copy.deepcopy(model)
    masks = magnitude_masks(pruned, sparsities)
    MaskHook(masks)(pruned)
    return pruned, masks


def _save_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sparse_state(model: nn.Module) -> dict[str, Any]:
    """The state dict with each weight stored as CSR (int32 indices) where that is smaller.

    A 4-d convolution weight is stored as its (out, in·k·k) matrix; :func:`dense_state`
    restores the shapes.
    """
    tensors, shapes = {}, {}
    for key, value in model.state_dict().items():
        tensors[key] = value
        if value.dim() >= 2 and value.is_floating_point():
            matrix = value.detach().cpu().reshape(value.shape[0], -1).to_sparse_csr()
            csr = torch.sparse_csr_tensor(matrix.crow_indices().int(), matrix.col_indices().int(),
                                          matrix.values(), matrix.shape)
            if len(_save_bytes(csr)) < len(_save_bytes(value)):
                tensors[key], shapes[key] = csr, list(value.shape)
    return {"format": SPARSE_FORMAT, "tensors": tensors, "shapes": shapes}


def dense_state(saved: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Undo :func:`sparse_state`: a plain state dict for ``load_state_dict``."""
    if saved.get("format") != SPARSE_FORMAT:
        raise AutopruneError(f"not an autoprune sparse weights file (format {saved.get('format')!r})")
    return {k: v.to_dense().reshape(saved["shapes"][k]) if k in saved["shapes"] else v
            for k, v in saved["tensors"].items()}


def sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of ``torch.save`` of the state dict, dense and in the sparse (CSR) format."""
    return {"dense_bytes": len(_save_bytes(model.state_dict())),
            "sparse_bytes": len(_save_bytes(sparse_state(model)))}


SCAN_COLUMNS = ["base_model", "group", "ratio", "weights", "val_accuracy", "drop"]


def scan_sparsities(model: nn.Module, costs: WeightCosts, data: Data, base_accuracy: float, device: torch.device,
                    path: Path | None, grid: Sequence[float] = GRID, bn_batches: int = 8, quiet: bool = False,
                    base_id: str = "") -> pd.DataFrame:
    """Per layer and grid sparsity, validation accuracy with only that layer pruned.

    Rows are written to ``path`` (``sensitivity.csv``) after each cell and reused on a rerun;
    ``group`` holds the layer name and ``ratio`` the sparsity, as in the channel scan.
    """
    table = pd.read_csv(path) if path is not None and path.is_file() else pd.DataFrame(columns=SCAN_COLUMNS)
    mine = table["base_model"].astype(str) == base_id
    done = {(g, round(float(r), 6)) for g, r in zip(table.loc[mine, "group"], table.loc[mine, "ratio"])}
    cells = [(n, r) for n in costs.names for r in grid if (n, round(r, 6)) not in done]
    train_loader, val_loader = data.loader("train", 64, shuffle=True), data.loader("val", 256)
    rows = [table]
    for name, sparsity in tqdm(cells, desc="sensitivity", disable=quiet or not cells, unit="cell"):
        pruned, _ = prune_weights(model, {name: sparsity})
        torch.manual_seed(0)
        recalibrate_bn(pruned.to(device), train_loader, device, bn_batches, task=data.task)
        accuracy = evaluate(pruned, val_loader, device, data.task)
        rows.append(pd.DataFrame([{"base_model": base_id, "group": name, "ratio": sparsity,
                                   "weights": int(costs.sizes[costs.names.index(name)]),
                                   "val_accuracy": accuracy, "drop": base_accuracy - accuracy}]))
        if path is not None:
            with atomic_path(path) as tmp:
                pd.concat([r for r in rows if len(r)], ignore_index=True).to_csv(tmp, index=False)
    table = pd.concat([r for r in rows if len(r)], ignore_index=True)
    return table[table["base_model"].astype(str) == base_id].reset_index(drop=True)


def equal_drop_sparsities(table: pd.DataFrame, costs: WeightCosts, limit: float, high: float) -> np.ndarray:
    """Sparsities that give every layer the same accuracy drop and just meet ``limit``."""
    found = curves(table, list(costs.names))

    def at(drop: float) -> np.ndarray:
        return np.clip([ratio_at_drop(found[n], drop) for n in costs.names], 0.0, high)

    lo, hi = 0.0, max(float(d.max()) for _, d in found.values()) + 1e-9
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if costs.nonzero(at(mid)) <= limit else (mid, hi)
    return project_sparsities(costs, at(hi), limit, high)


@dataclass
class WeightProblem:
    """Everything a weight-level trial needs, fixed for the study."""

    model: nn.Module
    data: Data
    costs: WeightCosts
    limit: float
    high: float
    seed_sparsities: np.ndarray
    base_val_accuracy: float
    device: torch.device
    teacher_outputs: TeacherOutputs | None = None  # the base's outputs on the training set, for --distill


def _param(name: str) -> str:
    return f"sparsity:{name}"


def finetune_sparse(problem: WeightProblem, sparsities: np.ndarray, settings: Settings, epochs: float, seed: int,
                    quiet: bool, desc: str) -> tuple[nn.Module, float, float]:
    """Prune the base to ``sparsities``, recalibrate, fine-tune with masks held; (model, acc before, after)."""
    p, s = problem, settings
    model, masks = prune_weights(p.model, dict(zip(p.costs.names, sparsities.tolist())))
    torch.manual_seed(seed)
    train_loader = p.data.loader("train", s.batch_size, shuffle=True, seed=seed)
    val_loader = p.data.loader("val", 256)
    model.to(p.device)
    recalibrate_bn(model, train_loader, p.device, s.bn_batches, task=p.data.task)
    before = evaluate(model, val_loader, p.device, p.data.task)
    train(model, train_loader, epochs, p.device, lr=s.lr, desc=desc, quiet=quiet,
          distill=from_settings(p.model, s.extra, p.teacher_outputs), after_step=MaskHook(masks), task=p.data.task)
    return model, before, evaluate(model, val_loader, p.device, p.data.task)


class WeightObjective:
    """One trial: sample per-layer sparsities, project onto the budget, fine-tune with masks, score."""

    def __init__(self, problem: WeightProblem, settings: Settings, quiet: bool) -> None:
        self.problem, self.settings, self.quiet = problem, settings, quiet

    def __call__(self, trial: optuna.Trial) -> float:
        p, s = self.problem, self.settings
        start = time.perf_counter()
        raw = np.array([trial.suggest_float(_param(n), 0.0, p.high) for n in p.costs.names])
        sparsities = project_sparsities(p.costs, raw, p.limit, p.high)
        model, before, accuracy = finetune_sparse(p, sparsities, s, s.finetune_epochs, s.seed + trial.number,
                                                  self.quiet, f"trial {trial.number}")
        nonzero = count_nonzero(model)
        trial.set_user_attr("sparsities", dict(zip(p.costs.names, sparsities.round(6).tolist())))
        trial.set_user_attr("nonzero_params", nonzero)
        trial.set_user_attr("nonzero_share", nonzero / p.costs.base)
        trial.set_user_attr("val_accuracy_before_finetune", before)
        trial.set_user_attr("val_accuracy", accuracy)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        return accuracy


def run_trials(problem: WeightProblem, study: optuna.Study, settings: Settings, quiet: bool = False) -> None:
    """Run trials until ``study`` holds ``settings.trials`` finished ones; the equal-drop seed first."""
    if finished(study) >= settings.trials:
        return
    if not study.trials:
        study.enqueue_trial({_param(n): float(s) for n, s in zip(problem.costs.names, problem.seed_sparsities)})
    study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.trials), multivariate=True,
                                               n_startup_trials=max(3, min(10, settings.trials // 4)))

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE and not quiet:
            a = trial.user_attrs
            tqdm.write(f"trial {trial.number}: val {a['val_accuracy']:.2%} (before fine-tune "
                       f"{a['val_accuracy_before_finetune']:.2%}) | {human(a['nonzero_params'])} {LABEL} "
                       f"({a['nonzero_share']:.1%} of base) | {a['seconds']:.1f}s | best {study.best_value:.2%}")
        if finished(study) >= settings.trials:
            study.stop()

    while finished(study) < settings.trials:
        study.optimize(WeightObjective(problem, settings, quiet), n_trials=settings.trials - finished(study),
                       callbacks=[report], gc_after_trial=False)


def export_weights(problem: WeightProblem, sparsities: np.ndarray, out: Path, settings: Settings, quiet: bool,
                   plan: Plan, **record: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune the winner longer with masks held, test it once, write it with its sizes."""
    p = problem
    model, _, val_accuracy = finetune_sparse(p, sparsities, settings, settings.final_epochs, settings.seed, quiet,
                                             "final fine-tune")
    test_loader = p.data.loader("test", 256)
    base_test = evaluate(p.model, test_loader, p.device, p.data.task)
    test_accuracy = evaluate(model, test_loader, p.device, p.data.task)
    model = model.cpu().eval()  # plain tensors with the zeros in them: nothing to fold or unwrap
    dense = count(model, p.data.example_input())
    nonzero = count_nonzero(model)
    out.mkdir(parents=True, exist_ok=True)
    save_torch(model, out / "model.pt")
    save_torch(model.state_dict(), out / "weights.pt")
    save_torch(sparse_state(model), out / "weights_sparse.pt")
    plan.save(out / "plan.json")
    summary = {"granularity": "weight", "base_params": p.costs.base, "nonzero_params": nonzero,
               "nonzero_share": nonzero / p.costs.base, "nonzero_unit": LABEL,
               "flops": dense.flops, "params": dense.params, "flops_unit": "thop MACs (dense; unchanged by "
               "weight pruning)", **{f"model_{k}": v for k, v in sizes(model).items()},
               "base_val_accuracy": p.base_val_accuracy, "val_accuracy": val_accuracy,
               "base_test_accuracy": base_test, "test_accuracy": test_accuracy,
               "sparsities": dict(zip(p.costs.names, np.round(sparsities, 6).tolist())), **record}
    write_json(out / "summary.json", summary)
    return model, summary


def weight_limit(budget: str | Budget, costs: WeightCosts) -> float:
    """The nonzero-params cap a budget sets; weight pruning leaves FLOPs (thop MACs) as they are."""
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    if budget.flops is not None or budget.params is None:
        raise AutopruneError(f"budget {budget} does not fit --granularity weight: it caps nonzero params "
                             "only (dense FLOPs do not shrink); write it as params=0.2 or params=1.5M")
    return budget.limits(Cost(math.inf, costs.base)).params


def _weight_limit(base: nn.Module, budget: Budget, max_ratio: float) -> tuple[WeightCosts, float]:
    """The model's weight costs and the budget's nonzero cap; refused if it does not prune or is out of reach."""
    costs = WeightCosts.of(base)
    limit = weight_limit(budget, costs)
    if limit >= costs.base:
        raise AutopruneError(f"budget {budget} does not prune: the base model's {human(costs.base)} "
                             f"{LABEL} already meet it; ask for less than the base, e.g. params=0.5")
    project_sparsities(costs, np.zeros(len(weight_layers(base))), limit, max_ratio)  # refuse early
    return costs, limit


def search_weights(model: nn.Module | str, data: Data | str | Sequence, budget: str | Budget,
                   options: SearchOptions) -> Result:
    """:func:`autoprune.search` with ``granularity="weight"``: per-layer sparsity under a nonzero budget.

    Of ``options`` it takes the base model's, the data's, the study's and the fine-tune's; its
    sensitivity grid and largest sparsity default to :data:`~autoprune.study.sensitivity.GRID` and 0.9.

    Example:
        >>> result = autoprune.search("mlp", "digits", "params=0.2", granularity="weight", trials=8)
        >>> result.summary["nonzero_share"] <= 0.2
        True
    """
    started = time.perf_counter()
    o = options
    torch.manual_seed(o.seed)
    grid, max_ratio, quiet = o.grid or GRID, 0.9 if o.max_ratio is None else o.max_ratio, o.quiet
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    r = prepare(model, data, budget, o, kind="weight",
                before_training=lambda base, _: _weight_limit(base, budget, max_ratio))
    data, out, base, device, base_id, name, study_name = r.data, r.out, r.base, r.device, r.base_id, r.name, r.study
    o = distillation(r, o)
    extra = extra_settings(o)
    settings = Settings.of(o, extra)
    costs, limit = _weight_limit(base, budget, max_ratio)
    config = config_dict(model=name, base_model=base_id, dataset=data.name, budget=str(budget), granularity="weight",
                         grid=[float(g) for g in grid], max_ratio=max_ratio, finetune_epochs=o.finetune_epochs,
                         lr=o.lr, batch_size=o.batch_size, bn_batches=o.bn_batches, seed=o.seed,
                         **{k: v for k, v in extra.items() if k == "distill"})
    claim_run(out, study_name)
    the_study = open_study(study_name, r.storage, config, new=o.new_study)
    record_run(the_study, out, name)
    if not (out / "base.pt").is_file():
        save_torch(base.state_dict(), out / "base.pt")
    base_val = evaluate(base, data.loader("val", 256), device, data.task)
    if not quiet:
        print(f"base {name} on {data.name}: val {base_val:.2%} | {human(costs.base)} {LABEL} | "
              f"{len(costs.names)} layers | budget {budget}: ≤ {human(limit)} nonzero params")
    table = scan_sparsities(base, costs, data, base_val, device, out / "sensitivity.csv", grid, o.bn_batches,
                            quiet, base_id)
    seeded = equal_drop_sparsities(table, costs, limit, max_ratio)
    problem = WeightProblem(base, data, costs, limit, max_ratio, seeded, base_val, device,
                            distill_outputs(r, o))
    run_trials(problem, the_study, settings, quiet)
    chosen = best_trial(the_study)
    sparsities = np.array([chosen.user_attrs["sparsities"][n] for n in costs.names])
    meta = {"model": absolute_spec(name), "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "dataset": data.name, "study": study_name, "trial": chosen.number, "granularity": "weight",
            "sparsities": chosen.user_attrs["sparsities"]}
    plan = Plan({}, {}, "magnitude", base_id, meta)  # no channel removed: load_pruned loads weights.pt as is
    write_text(out / "trials.csv", trials_table(the_study).to_csv(index=False))
    record = dict(budget=str(budget), budget_nonzero_params=limit, trial=chosen.number,
                  trial_val_accuracy=chosen.value, final_epochs=o.final_epochs,
                  trials=len(the_study.get_trials(deepcopy=False, states=ENDED)),
                  model=name, base_model=base_id, dataset=data.name, study=study_name, storage=r.storage,
                  device=str(device), input_shape=list(data.input_shape), **extra)
    pruned, summary = export_weights(problem, sparsities, out, settings, quiet, plan, **record)
    summary.update(seconds=round(time.perf_counter() - started, 1), command=command_line(), versions=versions())
    write_json(out / "summary.json", summary)
    return Result(pruned, plan, summary, the_study, out)
