"""Fine-tune step time without distillation, with the live teacher and with its cached outputs.

The base model (trained briefly, so its logits look like a real teacher's) teaches a
uniformly pruned copy, as a search's trials do. Each mode fine-tunes a fresh copy of
the pruned model for ``--steps`` steps after one warm-up step; the modes take turns
for ``--rounds`` rounds (the machine may be shared) and the median is reported.
Then one epoch each with the live teacher and with the cache, from the same start and
seed, shows what storing the logits in float16 changes.

    OMP_NUM_THREADS=1 python examples/distill_cache/step_time.py --dataset fashion-mnist --model resnet18
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from autoprune.cost.budget import Budget, fit_plan
from autoprune.cost.costmodel import CostModel
from autoprune.inputs.data import load_data
from autoprune.inputs.models import build_model
from autoprune.prune.groups import ChannelGroups
from autoprune.train.distill import Distill, kd_loss
from autoprune.train.loop import evaluate, train
from autoprune.train.teacher import teacher_outputs, with_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--base-epochs", type=float, default=2.0)
    parser.add_argument("--flops", type=float, default=0.25, help="the pruned student's share of the FLOPs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    data = load_data(args.dataset)
    if len(data.train) > args.train_images:
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        data = replace(data, train=Subset(data.train, sorted(order[:args.train_images].tolist())))
    base = build_model(args.model, data.num_classes, input_shape=data.input_shape)
    train(base, data.loader("train", args.batch_size, shuffle=True), args.base_epochs, device, lr=0.05, quiet=True,
          task=data.task)
    base.eval()
    groups = ChannelGroups(base, data.example_input())
    costs = CostModel(groups)
    n = len(groups)
    _, student, cost = fit_plan(groups, costs, np.full(n, 0.5), Budget(flops=args.flops).limits(costs.base),
                                np.zeros(n), np.full(n, 0.9))
    print(f"{args.model} on {args.dataset} ({len(data.train)} training images, {data.input_shape}), "
          f"batch {args.batch_size}, {torch.get_num_threads()} thread(s); student at "
          f"{cost.flops / costs.base.flops:.0%} of the FLOPs; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        clock = time.perf_counter()
        cache = teacher_outputs(base, data, Path(folder) / "teacher_outputs.pt", device)
        print(f"computing the cache: {time.perf_counter() - clock:.1f}s ({len(data.train)} images)")
        clock = time.perf_counter()
        teacher_outputs(base, data, Path(folder) / "teacher_outputs.pt", device, quiet=True)
        print(f"reading it back (a resumed run): {time.perf_counter() - clock:.2f}s")
    modes = {"no distillation": None, "live teacher": Distill(base), "cached outputs": Distill(base, outputs=cache)}
    per_batch = len(data.loader("train", args.batch_size, shuffle=True))
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, distill in modes.items():
            model = copy.deepcopy(student)
            train(model, data.loader("train", args.batch_size, shuffle=True), 1 / per_batch, device, quiet=True,
                  distill=distill, task=data.task)  # warm-up step
            clock = time.perf_counter()
            train(model, data.loader("train", args.batch_size, shuffle=True), args.steps / per_batch, device,
                  quiet=True, distill=distill, task=data.task)
            times[mode].append((time.perf_counter() - clock) / args.steps * 1000)
    plain = statistics.median(times["no distillation"])
    print("| mode | ms per step (median) | rounds | × no distillation |\n| --- | --- | --- | --- |")
    for mode, found in times.items():
        middle = statistics.median(found)
        print(f"| {mode} | {middle:.0f} | {', '.join(f'{t:.0f}' for t in found)} | {middle / plain:.2f} |")
    # What float16 storage changes: the loss on every training batch, then one epoch each way.
    worst = 0.0
    student.eval()
    for indices, (images, labels) in with_indices(data.loader("train", args.batch_size, shuffle=True)):
        with torch.no_grad():
            logits, exact = student(images), base(images)
            half = cache.lookup(indices, device)
        exact_loss, half_loss = kd_loss(logits, exact, labels), kd_loss(logits, half, labels)
        worst = max(worst, abs((half_loss - exact_loss) / exact_loss).item())
    print(f"float16 cache vs live teacher: distillation loss differs by at most {worst:.1e} (relative) "
          "over the training batches")
    scores = {}
    for mode in ("live teacher", "cached outputs"):
        model = copy.deepcopy(student)
        torch.manual_seed(1)
        train(model, data.loader("train", args.batch_size, shuffle=True, seed=1), 1, device, quiet=True,
              distill=modes[mode], task=data.task)
        scores[mode] = evaluate(model, data.loader("val", 256), device, data.task)
    print("after one epoch: " + ", ".join(f"{mode} val {score:.2%}" for mode, score in scores.items()))


if __name__ == "__main__":
    main()
