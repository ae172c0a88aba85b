"""Training, fine-tuning, evaluation and BatchNorm recalibration."""

from __future__ import annotations

import math
import time
from itertools import islice
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from autoprune.errors import AutopruneError
from autoprune.inputs.task import Task
from autoprune.options import FINETUNE_LR
from autoprune.train.distill import Distill, distill_loss
from autoprune.train.teacher import with_indices


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise AutopruneError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutopruneError(f"device {spec!r} asked for but CUDA is not available; use --device cpu")
    return device


def _endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def train(
    model: nn.Module,
    loader: DataLoader,
    epochs: float,
    device: torch.device,
    lr: float = FINETUNE_LR,
    weight_decay: float = 5e-4,
    desc: str = "train",
    quiet: bool = False,
    distill: Distill | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    check: Callable[[nn.Module, int], None] | None = None,
    checks: int = 0,
    seconds: float | None = None,
    *,
    task: Task,
) -> nn.Module:
    """Train ``model`` on ``task``'s loss for ``epochs`` passes over ``loader`` (fractions allowed).

    SGD with Nesterov momentum and a cosine schedule (or the task's own optimizer and
    schedule): the recipe every method autoprune compares gets, so differences come
    from the pruning, not the training.
    ``distill`` adds a teacher's softened predictions to the loss (its outputs looked up by
    sample index where ``distill.outputs`` serves ``loader``, else the teacher run live); ``after_step``
    runs after every optimiser step (weight-level pruning re-applies its masks there).
    ``check(model, k)`` runs ``checks`` times, evenly spaced before the end
    (k = 1 … checks); it may raise to stop the training (a search's pruner does).
    ``seconds`` trains for that long instead, the cosine schedule spread over
    the time rather than the steps, so a fine-tune given a wall time uses all
    of it and ends at a learning rate of zero (``epochs`` is then ignored).
    """
    if seconds is not None:
        steps = None if seconds > 0 else 0  # None: no step count, the clock ends it
    else:
        steps = max(1, math.ceil(epochs * len(loader))) if epochs > 0 else 0
    model.to(device).train()
    if steps == 0:
        return model.eval()
    if task.optimizer is not None:
        optimizer = task.optimizer(model.parameters(), lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                    weight_decay=weight_decay)
    initial = [group["lr"] for group in optimizer.param_groups]
    schedule = None
    if steps:
        make = task.schedule or torch.optim.lr_scheduler.CosineAnnealingLR
        schedule = make(optimizer, steps)
    end = time.perf_counter() + seconds if seconds else None
    cached = distill is not None and distill.outputs is not None and distill.outputs.serves(loader)
    if distill is not None and not cached:
        distill.teacher.to(device).eval()
    source = with_indices(loader) if cached else loader  # cached: (indices, batch), the same batches in the same order
    bar = tqdm(islice(_endless(source), steps), total=steps, desc=desc, disable=quiet, leave=False, unit="step")
    at = {math.ceil(k * steps / (checks + 1)): k for k in range(1, checks + 1)} if check and steps else {}
    for step, batch in enumerate(bar, 1):
        if end is not None:  # time-based cosine: the share of the time spent sets the learning rate
            spent = 1.0 - (end - time.perf_counter()) / seconds
            if spent >= 1.0:
                break
            for group, start in zip(optimizer.param_groups, initial):
                group["lr"] = 0.5 * start * (1.0 + math.cos(math.pi * spent))
        if cached:
            indices, batch = batch
        batch = task.to_device(batch, device)
        if distill is None:
            loss = task.batch_loss(model, batch)
        else:  # classification, or a task with its own distill_loss (refused otherwise before any work)
            if cached:
                teacher_output = distill.outputs.lookup(indices, device)
            else:
                with torch.no_grad():
                    teacher_output = task.call(distill.teacher, batch)
            loss = distill_loss(distill, task, model, batch, teacher_output)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
        if schedule is not None:
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step in at:
            check(model, at[step])
            model.train()
    return model.eval()


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, task: Task) -> float:
    """``task``'s score of ``model`` on ``loader`` (top-1 accuracy for classification)."""
    return task.evaluate(model, loader, device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device, batches: int = 8, *,
                   task: Task) -> nn.Module:
    """Re-estimate BatchNorm statistics on a few training batches.

    Removing channels shifts the statistics every later BatchNorm sees; a cheap
    pass over ``batches`` batches, with nothing trained, puts them right. Only the
    BatchNorm layers are put in training mode: the model runs its inference path
    (a detector needs no targets there) and dropout stays off.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return model.eval()
    momenta = [m.momentum for m in norms]
    model.to(device).eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches seen
        norm.train()
    seen: set[nn.Module] = set()

    def stop_after_the_last(norm: nn.Module, inputs: tuple, output: object) -> None:
        seen.add(norm)
        if len(seen) == len(norms):  # every statistic is in: the rest (a head, a detector's NMS) is not needed
            raise _StatsDone

    hooks = [norm.register_forward_hook(stop_after_the_last) for norm in norms]
    try:
        for batch in islice(_endless(loader), batches):
            seen.clear()
            try:
                task.call(model, task.to_device(batch, device))
            except _StatsDone:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


class _StatsDone(Exception):
    """Raised inside a forward pass once every BatchNorm layer has seen its batch."""
