"""FastNAS (NVIDIA ModelOpt, ``modelopt.torch.prune``) as a peer row of the equal-time benchmark.

``autoprune bench --methods fastnas`` gives FastNAS what every method gets: the
same base weights, the same budget as thop counts it, the same validation
images to rank candidates by, and the same wall time. The row is made as
ModelOpt documents its pruning:

1. ``mtp.prune(model, mode="fastnas", constraints={"flops": "x%"}, ...)``:
   FastNAS scores every width choice of every prunable layer on its own (the
   pre-search "sensitivity map"), then binary-searches one accuracy-drop
   threshold onto its FLOPs constraint. Its ``score_func`` is top-1 on the
   score split autoprune's searches rank candidates on (:attr:`Data.score`);
   BatchNorm is recalibrated the way FastNAS does it: its ``data_loader`` (the
   training split) fills a queue of :data:`BN_BATCHES` batches, and every
   ``model.eval()`` in the score function re-estimates the statistics on them.
   Widths: FastNAS's own ratio choices (5 % steps), in multiples of the search
   space's ``round_to`` (8 for ResNets), the channel granularity autoprune's
   plans keep, rather than FastNAS's default 32, which cannot reach a 5 %
   budget on ResNet-18.
2. FastNAS counts FLOPs its own way (torchprofile, 2 × MACs, BatchNorm left
   out); thop counts MACs and BatchNorm too, so the same share of the base is
   not the same share to both. The constraint is given as a share of the base
   and corrected until the exported model meets the budget *as thop counts
   it*, ending within :data:`TOLERANCE` below it or after :data:`SEARCHES`
   searches with the largest one that fits: a secant step on the share,
   bisection once the budget is bracketed. The later searches reuse the first
   one's sensitivity map (FastNAS's ``checkpoint``), so they cost a binary
   search over thresholds, not a second scoring pass.
3. The rest of the time budget (less what scoring the row takes, as
   ``autoprune search --time-budget`` keeps back) fine-tunes the exported
   model by the clock, the same recipe the other methods' final fine-tunes use
   (:func:`autoprune.train.loop.train`, BatchNorm recalibrated first, also where
   no time is left: FastNAS exports its subnet with statistics estimated for
   other subnets). Without a time budget it fine-tunes ``final_epochs``. Tested once.

``nvidia-modelopt`` is optional (``pip install "autoprune[bench-peers]"``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import io
import json
import math
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoprune.cost.budget import fits
from autoprune.counting import Cost, count
from autoprune.errors import AutopruneError, why
from autoprune.inputs.task import to_device
from autoprune.study.trials import Problem, Settings
from autoprune.train.loop import evaluate, recalibrate_bn, train

if TYPE_CHECKING:
    from autoprune.bench.equal_time import BenchConfig

NEEDS = 'fastnas needs nvidia-modelopt: pip install "autoprune[bench-peers]"'
BN_BATCHES = 50  # FastNAS's own default (max_iter_data_loader): the batches BatchNorm is recalibrated on
SEARCHES = 6  # most FastNAS searches to meet the budget as thop counts it
TOLERANCE = 0.01  # done once thop's count is within this share below the budget


def require() -> None:
    """Refuse in one line, before any work, where ModelOpt (or what it needs at import) is missing."""
    try:
        with _quiet():  # torchprofile: FastNAS's FLOPs counter, not one of ModelOpt's requirements
            for name in ("modelopt.torch.prune", "torchprofile"):
                importlib.import_module(name)
            counter = importlib.import_module("torchprofile.profile")
    except ImportError as err:  # ModelOpt itself, or a module it imports without requiring it
        raise AutopruneError(NEEDS if (err.name or "").startswith("modelopt") else f"{NEEDS} ({err})") from None
    if not hasattr(counter, "handlers"):  # what FastNAS patches to leave BatchNorm out; gone in torchprofile 0.1
        raise AutopruneError(f"{NEEDS} (FastNAS counts FLOPs with torchprofile<0.1)")


@contextlib.contextmanager
def _quiet():
    """ModelOpt prints progress bars, profiling tables and warnings; the benchmark prints one line a row."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _args(inputs: Any) -> Any:
    """A model input as ModelOpt's ``dummy_input``/``collect_func`` take it: a tuple would be unpacked
    into positional arguments, so anything but a tensor is passed as one argument (``(x, {})``)."""
    return inputs if isinstance(inputs, torch.Tensor) else (inputs, {})


def _mode(round_to: int) -> list[tuple[str, dict]]:
    """FastNAS's default rules (width ratios in 5 % steps) with channels in multiples of ``round_to``."""
    from modelopt.torch.prune.fastnas import FastNASConfig

    rules = FastNASConfig().model_dump()
    for rule in rules.values():
        for layer in (rule or {}).values():
            for key in ("channel_divisor", "feature_divisor"):
                if isinstance(layer, dict) and key in layer:
                    layer[key] = round_to
    return [("fastnas", rules)]


class _Searcher:
    """FastNAS searches of one base model at one share after another, sharing one sensitivity map."""

    def __init__(self, problem: Problem, seed: int, folder: Path) -> None:
        self.problem, self.seed = problem, seed
        self.checkpoint = folder / "fastnas_search.pth"
        self.scored = 0  # candidates FastNAS scored (the sensitivity map, and the base)
        self.searches = 0
        data, device = problem.data, problem.device
        self.example = to_device(problem.groups.example_input, device)
        self.score_loader = data.loader("score", 256)

    def score(self, model: nn.Module) -> float:
        """FastNAS's ``score_func``: top-1 on the score split (``evaluate`` calls ``model.eval()``, where
        FastNAS recalibrates BatchNorm on its queue)."""
        self.scored += 1
        return evaluate(model, self.score_loader, self.problem.device, self.problem.data.task)

    def search(self, share: float) -> tuple[nn.Module, float] | None:
        """The exported subnet FastNAS picks under ``share`` of the base's FLOPs as it counts them, and
        the share it counts for that subnet (None: no subnet of its search space is that small)."""
        import modelopt.torch.prune as mtp

        p, task = self.problem, self.problem.data.task
        model = copy.deepcopy(p.model).to(p.device)
        loader = p.data.loader("train", Settings().batch_size, shuffle=True, seed=self.seed)
        config = {"data_loader": loader, "max_iter_data_loader": BN_BATCHES, "score_func": self.score,
                  "collect_func": lambda batch: _args(task.inputs(task.to_device(batch, p.device))),
                  "checkpoint": str(self.checkpoint), "verbose": False}
        torch.manual_seed(self.seed)
        self.searches += 1
        try:
            with _quiet():
                model, state = mtp.prune(model, mode=_mode(p.round_to), constraints={"flops": f"{100 * share:.6g}%"},
                                         dummy_input=_args(self.example), config=config)
        except ValueError as err:
            if "NOT all constraints can be satisfied" in str(err):
                return None
            raise AutopruneError(f"FastNAS failed on this model: {why(err)}"[:400]) from err
        except (RuntimeError, AssertionError, KeyError, TypeError, AttributeError) as err:  # the row says so
            raise AutopruneError(f"FastNAS failed on this model: {why(err)}"[:400]) from err
        return model, state["best"]["constraints"]["flops"] / self.base_flops

    @functools.cached_property
    def base_flops(self) -> float:
        """The base model's FLOPs as FastNAS counts them (torchprofile: 2 × MACs, BatchNorm left out)."""
        from modelopt.torch.nas.utils import inference_flops

        with _quiet():
            return float(inference_flops(self.problem.model, dummy_input=_args(self.example), unit=1.0))


def search_to_budget(problem: Problem, seed: int, folder: Path) -> tuple[nn.Module, Cost, dict]:
    """FastNAS's subnet, exported, whose thop count meets ``problem.limits``; its cost; and what it took.

    Raises :class:`AutopruneError` where no FastNAS subnet meets the budget.
    """
    searcher = _Searcher(problem, seed, folder)
    goal, base = problem.limits.flops, problem.costs.base.flops
    share, low, high = goal / base, 0.0, math.inf  # FastNAS shares known to fit / to overshoot thop's budget
    best: tuple[nn.Module, Cost, float, float] | None = None  # subnet, its cost, share asked, share FastNAS counted
    shares: list[tuple[float, float]] = []  # (FastNAS share asked, thop share got)
    seconds: list[float] = []  # each search's (the first scores the sensitivity map)
    for _ in range(SEARCHES):
        clock = time.perf_counter()
        found = searcher.search(share)
        seconds.append(time.perf_counter() - clock)
        if found is None:
            if not shares:
                raise AutopruneError(f"FastNAS cannot reach this budget: no subnet of its search space has "
                                     f"{share:.1%} of the base's FLOPs as it counts them")
            shares.append((share, math.nan))
            low = max(low, share)  # smaller than its smallest subnet: as good as fitting, for the bracket
            share = (low + min(high, 1.0)) / 2 if high < math.inf else share * 1.5
            continue
        model, counted = found
        cost = count(model, problem.groups.example_input)
        shares.append((share, cost.flops / base))
        if fits(cost, problem.limits):
            low = share
            if best is None or cost.flops > best[1].flops:
                best = (model, cost, share, counted)
            if cost.flops >= (1 - TOLERANCE) * goal:
                break
        else:
            high = share
        step = share * goal / cost.flops * (1 - TOLERANCE / 2 if cost.flops > goal else 1.0)  # secant through 0
        step = min(step, 2 * share, 1.0)
        if high < math.inf:  # bracketed: the secant step, unless it would all but repeat an end; else bisect
            margin = 0.1 * (high - low)
            step = step if low + margin < step < high - margin else (low + high) / 2
        share = step
        if share <= low:  # asked for the whole base and still under the budget: FastNAS wants no more
            break
    if best is None:
        raise AutopruneError(f"FastNAS found no subnet within the budget as thop counts it in {SEARCHES} "
                             f"searches (FastNAS share asked -> thop share got: "
                             + ", ".join(f"{a:.2%} -> {b:.2%}" for a, b in shares) + ")")
    model, cost, share, counted = best
    return model, cost, {"scored": searcher.scored, "searches": searcher.searches, "share": share,
                         "shares": shares, "counted": counted, "seconds": seconds}


def widths(model: nn.Module) -> dict[str, int]:
    """The exported subnet's widths: output channels or features of every conv and linear layer."""
    return {name: getattr(m, "out_channels", getattr(m, "out_features", 0)) for name, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def fastnas_row(problem: Problem, seed: int, config: BenchConfig, reserve: float = 0.0) -> dict:
    """One benchmark row for FastNAS: search, fine-tune for the rest of ``config.time_budget`` (less
    ``reserve``, the scoring the row takes; ``final_epochs`` without a time budget), test once.

    The keys are those of the other methods' rows (:func:`autoprune.bench.equal_time.finish` and the
    run's bookkeeping): ``trials`` counts the candidates FastNAS scored, ``plan`` holds the subnet's
    widths (not an autoprune plan), ``note`` what meeting the budget took.
    """
    require()
    data, device = problem.data, problem.device
    start = time.perf_counter()
    with TemporaryDirectory(prefix="autoprune-fastnas-") as folder:
        model, cost, info = search_to_budget(problem, seed, Path(folder))
    search_seconds = time.perf_counter() - start
    settings = Settings(final_epochs=config.final_epochs, seed=seed)
    seconds = max(config.time_budget - search_seconds - reserve, 0.0) if config.time_budget else None
    clock = time.perf_counter()
    loader = data.loader("train", settings.batch_size, shuffle=True, seed=seed)
    torch.manual_seed(seed)
    model = model.to(device)
    # Always, time or not: FastNAS exports its subnet with BatchNorm statistics estimated for other subnets
    # during its search (resnet18 at 5 %: chance accuracy); the final recipe recalibrates every method's.
    recalibrate_bn(model, loader, device, settings.bn_batches, task=data.task)
    steps = [0]
    train(model, loader, settings.final_epochs, device, lr=settings.lr, desc="final fine-tune", quiet=True,
          after_step=lambda _: steps.__setitem__(0, steps[0] + 1), seconds=seconds, task=data.task)
    tuned = time.perf_counter() - clock
    base, cost = problem.costs.base, count(model, problem.groups.example_input)  # the final model, as thop counts it
    if not fits(cost, problem.limits):  # fine-tuning keeps the architecture: a guard, not a step
        raise AutopruneError(f"fastnas: the fine-tuned model has {cost.flops / base.flops:.2%} of the base's FLOPs")
    trace = ", ".join(f"{a:.2%}->{b:.2%} in {t:.0f}s" for (a, b), t in zip(info["shares"], info["seconds"]))
    note = (f"FastNAS: {info['scored']} candidates scored, {info['searches']} search(es) (FLOPs share asked as FastNAS "
            f"counts -> got as thop counts: {trace}); the subnet kept has {info['counted']:.2%} of the base's FLOPs "
            f"as FastNAS counts them, {cost.flops / base.flops:.2%} as thop does"
            + (f"; the search took {search_seconds:.0f}s of the {config.time_budget:g}s time budget: no time left to "
               "fine-tune" if seconds == 0.0 else ""))
    return {"test_accuracy": evaluate(model, data.loader("test", 256), device, data.task),
            "val_accuracy": evaluate(model, data.loader("val", 256), device, data.task),
            "flops": cost.flops, "params": cost.params, "flops_share": cost.flops / base.flops,
            "params_share": cost.params / base.params, "trials": info["scored"], "pruned": 0,
            "search_seconds": round(search_seconds, 1), "final_epochs": round(steps[0] / len(loader), 2),
            "seconds": round(time.perf_counter() - start, 1), "wall_seconds": round(search_seconds + tuned, 1),
            "time_budget": config.time_budget or float("nan"), "overhead": float("nan"),
            "plan": json.dumps(widths(model)), "note": note}
