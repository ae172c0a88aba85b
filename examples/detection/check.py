"""Check the detection example without the autoprune CLI: train, halve, recalibrate, score.

Trains the base SSDlite with the task's loss as autoprune trains a base (SGD, Nesterov,
lr 0.05, cosine; an optional linear warm-up), reports seconds per epoch and val mAP@0.5,
then prunes every channel group to half, checks the pruned model in eval and train mode,
counts both, scores it after BatchNorm recalibration and, optionally, after a short
fine-tune at autoprune's fine-tune lr (0.01).

    python examples/detection/check.py --epochs 5 --finetune 0.5 --save /tmp/det_base.pt
    python examples/detection/check.py --load /tmp/det_base.pt   # skip training
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist_det  # noqa: E402  (the example, beside this file)

from autoprune.counting import count  # noqa: E402
from autoprune.groups import ChannelGroups  # noqa: E402
from autoprune.task import Task  # noqa: E402


def optimizer(net: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD as autoprune trains by default (Nesterov 0.9, weight decay 5e-4)."""
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def warm_cosine(step: int, steps: int, warmup: int) -> float:
    """The lr factor at ``step``: linear from 0.1 over ``warmup`` steps, then cosine to zero.

    Without a warm-up (autoprune's default) SSDlite still trains from scratch at lr 0.05.
    """
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def finetune(net: nn.Module, task: Task, loader: Iterable, epochs: float, lr: float) -> float:
    """``epochs`` (a fraction allowed) of SGD at ``lr``, cosine to zero, as autoprune fine-tunes; seconds taken."""
    opt = optimizer(net, lr)
    steps = max(1, round(epochs * len(loader)))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warm_cosine(s, steps, 0))
    start = time.perf_counter()
    net.train()
    for batch in islice(endless(loader), steps):
        loss = task.loss(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return time.perf_counter() - start


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def train(net: nn.Module, task: Task, loaders: tuple, args: argparse.Namespace) -> None:
    """``args.epochs`` epochs of the task's loss; seconds and val score after each."""
    train_loader, val_loader = loaders[0], loaders[1]
    opt = optimizer(net, args.lr)
    steps = args.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warm_cosine(s, steps, args.warmup))
    for epoch in range(args.epochs):
        net.train()
        start, total = time.perf_counter(), 0.0
        for step, batch in enumerate(train_loader):
            loss = task.loss(net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item()
            if step % 20 == 0:
                print(f"  step {step}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s", flush=True)
        seconds = time.perf_counter() - start
        score, score_seconds = timed_score(net, task, val_loader)
        print(f"epoch {epoch + 1}: {seconds:.0f} s, loss {total / len(train_loader):.3f}, "
              f"val {task.name} {task.show(score)} ({score_seconds:.1f} s)", flush=True)


def timed_score(net: nn.Module, task: Task, loader: Iterable) -> tuple[float, float]:
    """The task's score (eval mode, no grad) and the seconds it took."""
    start = time.perf_counter()
    net.eval()
    with torch.no_grad():
        score = task.score(net, loader)
    return score, time.perf_counter() - start


@torch.no_grad()
def recalibrate(net: nn.Module, task: Task, loader: Iterable, batches: int) -> None:
    """BatchNorm statistics re-estimated as autoprune does: eval mode, only BN in train mode."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches seen
        norm.train()
    for batch in islice(loader, batches):
        net(task.inputs(batch))
    net.eval()


def halve(net: nn.Module, task: Task, loaders: tuple, args: argparse.Namespace) -> None:
    """Every group pruned to half: runs in both modes, its cost, its score after recalibration."""
    train_loader, val_loader = loaders[0], loaders[1]
    batch = next(iter(train_loader))
    example = task.inputs(batch)[:1]
    start = time.perf_counter()
    groups = ChannelGroups(net.eval(), example, ignore=task.keep)
    print(f"{len(groups.groups)} groups in {time.perf_counter() - start:.1f} s", flush=True)
    small = groups.apply(groups.plan({g.id: g.channels // 2 for g in groups}))
    with torch.no_grad():
        found = small.eval()(task.inputs(batch))
    assert isinstance(found, list) and set(found[0]) == {"boxes", "scores", "labels"}, found
    two = (batch[0][:2], batch[1][:2])  # SSDlite's extra layers have BN on 1 × 1 maps: two images at least
    assert task.loss(small.train(), two).isfinite()
    base_cost, small_cost = count(net.eval(), example), count(small.eval(), example)
    print(f"base:   {base_cost}\nhalved: {small_cost} ({small_cost.flops / base_cost.flops:.1%} of the FLOPs)")
    score, _ = timed_score(small, task, val_loader)
    print(f"halved, no recalibration: val {task.name} {task.show(score)}")
    recalibrate(small, task, train_loader, args.bn_batches)
    score, _ = timed_score(small, task, val_loader)
    print(f"halved + BN recalibration ({args.bn_batches} batches): val {task.name} {task.show(score)}")
    if args.finetune:
        seconds = finetune(small, task, train_loader, args.finetune, args.finetune_lr)
        score, _ = timed_score(small, task, val_loader)
        print(f"halved + {args.finetune:g} epochs of fine-tuning at lr {args.finetune_lr:g} ({seconds:.0f} s): "
              f"val {task.name} {task.show(score)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (from 0.1 × lr)")
    parser.add_argument("--bn-batches", type=int, default=8)
    parser.add_argument("--finetune", type=float, default=0.0, help="epochs to fine-tune the halved model")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--save", type=Path, help="write the trained base's state dict here")
    parser.add_argument("--load", type=Path, help="start from this state dict and skip training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int,
                        help="torch threads (1 was far faster than 2 on 2 cores other jobs shared)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaders, task, net = fmnist_det.data(), fmnist_det.task(), fmnist_det.model()
    sizes = ", ".join(f"{len(loader.dataset)}" for loader in loaders)
    print(f"data ({sizes} canvases) and model in {time.perf_counter() - start:.1f} s", flush=True)
    if args.load:
        net.load_state_dict(torch.load(args.load))
    else:
        train(net, task, loaders, args)
        if args.save:
            torch.save(net.state_dict(), args.save)
    score, seconds = timed_score(net, task, loaders[1])
    print(f"base: val {task.name} {task.show(score)} ({seconds:.1f} s)", flush=True)
    halve(net, task, loaders, args)


if __name__ == "__main__":
    main()
