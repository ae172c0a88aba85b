"""Diagnostic: where does the time-based final fine-tune of the seed plan peak? (resnet18, 2 % FLOPs)

Replicates autoprune.export.final.finetune with seconds=S (the seed-matched recipe at 10 min: the
plan cut from the bench's base, BN recalibrated, SGD lr 0.01 nesterov, cosine spread over S seconds of
training) and every epoch, with the clock paused, scores the score split (what a search sees) and the
test split. Usage: python diag_finetune.py OUT MODEL BUDGET SECONDS SEED, where OUT/cache/fashion-mnist/MODEL/
holds a copy of the curve's base.pt and sensitivity.csv (measured: OUT=/tmp/diag_out, resnet18 0.02 490 0,
OMP_NUM_THREADS=1, with nothing else running). Writes OUT/diag_MODEL_SEED_SECONDS.json.
"""
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from autoprune.bench.equal_time import BenchConfig, _problem, _seed, _subject, bench_data
from autoprune.counting import count
from autoprune.study.trials import Settings
from autoprune.train.loop import evaluate, recalibrate_bn, resolve_device

out, name, budget, seconds, seed = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
config = BenchConfig(models=(name,), budgets=(budget,), out=out, time_budget=600.0, quiet=True)
device = resolve_device("cpu")
data = bench_data(config)
subject = _subject(name, data, config, device)
problem = _problem(subject, budget, config)
plan = _seed(problem, config)
s = Settings(seed=seed)
loader = data.loader("train", s.batch_size, shuffle=True, seed=seed)
torch.manual_seed(seed)
model = problem.groups.apply(plan).to(device)
print("flops share", count(model, problem.groups.example_input).flops / problem.costs.base.flops, flush=True)
recalibrate_bn(model, loader, device, s.bn_batches, task=data.task)
opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
task, trained, steps, epoch, rows = data.task, 0.0, 0, 0, []
score_loader, test_loader = data.loader("score", 256), data.loader("test", 256)
model.train()
done = False
while not done:
    for batch in loader:
        clock = time.perf_counter()
        spent = trained / seconds
        if spent >= 1.0:
            done = True
            break
        for g in opt.param_groups:
            g["lr"] = 0.5 * s.lr * (1 + math.cos(math.pi * spent))
        batch = task.to_device(batch, device)
        loss = task.batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trained += time.perf_counter() - clock
        steps += 1
    epoch += 1
    row = {"epoch": round(steps / len(loader), 2), "trained_s": round(trained, 1), "lr": opt.param_groups[0]["lr"],
           "score": evaluate(model, score_loader, device, task), "test": evaluate(model, test_loader, device, task)}
    model.train()
    rows.append(row)
    print(json.dumps(row), flush=True)
(out / f"diag_{name}_{seed}_{int(seconds)}.json").write_text(json.dumps(rows, indent=1))
