"""Check fmnist_seg.py without the autoprune CLI: train, halve every channel group, recalibrate, score.

    python examples/segmentation/check.py --epochs 6

Trains the base model with the task's loss as autoprune trains one (SGD, Nesterov momentum 0.9,
weight decay 5e-4, cosine to zero over the steps, batch 64), prunes every channel group to half
its channels with autoprune's ChannelGroups, counts both models, and scores the pruned one
after BatchNorm recalibration alone, then after a short fine-tune (``--keep 0.7`` cuts it to about
half the FLOPs, as ``--budget flops=0.5`` would). ``FMNIST_SEG_SMALL=1`` makes it a smoke test.
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
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist_seg  # noqa: E402  (this folder, not a package)

from autoprune.counting import count  # noqa: E402
from autoprune.groups import ChannelGroups  # noqa: E402
from autoprune.options import BASE_LR, FINETUNE_LR  # noqa: E402
from autoprune.task import Task  # noqa: E402


def train(model: nn.Module, task: Task, loader: DataLoader, epochs: int, lr: float) -> list[float]:
    """Train in place; the seconds each epoch took."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    times = []
    for epoch in range(epochs):
        model.train()
        start, total = time.perf_counter(), 0.0
        for batch in loader:
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        times.append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(loader):.4f}, {times[-1]:.1f} s", flush=True)
    return times


def score(model: nn.Module, task: Task, loader: Iterable) -> tuple[float, float]:
    """The task's score as autoprune takes it (eval mode, no gradients), and its seconds."""
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        value = task.score(model, loader)
    return value, time.perf_counter() - start


def recalibrate(model: nn.Module, loader: DataLoader, batches: int) -> nn.Module:
    """Re-estimate BatchNorm statistics on ``batches`` train batches, only the BN layers in train mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches seen
        norm.train()
    with torch.no_grad():
        for images, _ in islice(endless(loader), batches):
            model(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def per_class_iou(model: nn.Module, loader: Iterable) -> torch.Tensor:
    """Each class's IoU on the loader, to see which classes the mean hides."""
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(fmnist_seg.NUM_CLASSES, average="none")
    model.eval()
    with torch.no_grad():
        for images, masks in loader:
            metric.update(model(images)["out"].argmax(dim=1), masks)
    return metric.compute()


def halve(model: nn.Module, task: Task, example: torch.Tensor, share: float) -> nn.Module:
    """``model`` with every group cut to ``share`` of its channels (the least important, by L1, go),
    checked to give the base model's output, its FLOPs and params printed beside the base's."""
    groups = ChannelGroups(model.eval(), example, ignore=task.keep)
    pruned = groups.apply(groups.plan({g.id: int(g.channels * share) for g in groups}))
    with torch.no_grad():
        out = pruned.eval()(example)
    expected = (1, fmnist_seg.NUM_CLASSES, *example.shape[2:])
    assert isinstance(out, dict) and tuple(out["out"].shape) == expected, f"pruned model gave {out!r}"
    before, after = count(model, example), count(pruned, example)
    print(f"{len(groups.groups)} groups cut to {share:g}: FLOPs {before.flops / 1e6:.1f}M -> "
          f"{after.flops / 1e6:.1f}M ({after.flops / before.flops:.1%}), "
          f"params {before.params / 1e6:.2f}M -> {after.params / 1e6:.2f}M")
    return pruned


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="base training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=BASE_LR, help="base learning rate (default: %(default)s)")
    parser.add_argument("--load", type=Path, help="a base state_dict to start from instead of training one")
    parser.add_argument("--save", type=Path, help="write the trained base model's state_dict here")
    parser.add_argument("--keep", type=float, default=0.5, help="share of every group's channels kept")
    parser.add_argument("--bn-batches", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=1, help="then fine-tune the pruned model "
                        f"this long at lr {FINETUNE_LR:g}, as autoprune fine-tunes one")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 wastes least "
                        "where other processes share the cores")
    return parser.parse_args()


def main() -> None:
    args = options()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_set, val_set, _ = fmnist_seg.data()
    print(f"data: {len(train_set)}/{len(val_set)} canvases of {tuple(train_set[0][0].shape)} "
          f"in {time.perf_counter() - start:.1f} s")
    task = fmnist_seg.task()
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=len(train_set) > 64,
                              generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(val_set, batch_size=64)

    model = fmnist_seg.model()
    if args.load:
        model.load_state_dict(torch.load(args.load))
    times = train(model, task, train_loader, args.epochs, args.lr) if args.epochs else []
    base, seconds = score(model, task, val_loader)
    ious = per_class_iou(model, val_loader)
    trained = f"{len(times)} epochs, {sum(times) / len(times):.1f} s/epoch" if times else f"loaded {args.load}"
    print(f"base ({trained}): val {task.name} {task.show(base)} ({seconds:.1f} s to score), "
          f"without background {ious[1:].mean():.4f}")
    print("per-class IoU:", " ".join(f"{v:.2f}" for v in ious.tolist()))
    if args.save:
        torch.save(model.state_dict(), args.save)

    pruned = halve(model, task, val_set[0][0][None], args.keep)
    raw, _ = score(pruned, task, val_loader)
    recalibrate(pruned, train_loader, args.bn_batches)
    after, _ = score(pruned, task, val_loader)
    print(f"pruned: val {task.name} {task.show(raw)} as cut, {task.show(after)} after BN recalibration "
          f"on {args.bn_batches} batches (base {task.show(base)})")
    assert math.isfinite(after)
    if args.finetune_epochs:
        times = train(pruned, task, train_loader, args.finetune_epochs, FINETUNE_LR)
        tuned, _ = score(pruned, task, val_loader)
        print(f"pruned and fine-tuned {args.finetune_epochs} epochs ({sum(times) / len(times):.1f} s/epoch): "
              f"val {task.name} {task.show(tuned)}")


if __name__ == "__main__":
    main()
