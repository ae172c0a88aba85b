"""Merge the rows run in separate folders into each model's curve, name the raced rows, re-render both
reports. Idempotent: a row already in the curve (same model, budget, seed, method, time budget) is kept."""
from pathlib import Path

import pandas as pd

from autoprune.bench.equal_time import BenchConfig, report
from autoprune.files import write_text

root = Path("results/benchmarks/anytime")  # run from the repository root
KEY = ["model", "budget", "seed", "method", "time_budget"]
# Folders whose rows were made at f24e515, where autoprune raced at every time budget, and those made at
# 4785e75, where autoprune no longer races from 10 minutes on (-e, -f and -g at b4b9372: the same search;
# resnet18's 30-minute rows, -j and -l, at 460c489: uniform-matched given the time budget where only the
# default, autoprune-distill, was run).
RACED = {"mobilenet_v2": ("mobilenet_v2-30m-a", "mobilenet_v2-30m-b"), "resnet18": ()}
LATER = {"mobilenet_v2": ("mobilenet_v2-30m-c", "mobilenet_v2-30m-d", "mobilenet_v2-30m-e", "mobilenet_v2-30m-f"),
         "resnet18": ("resnet18-10m-e", "resnet18-10m-f", "resnet18-10m-g", "resnet18-30m-j", "resnet18-30m-l")}
MOBILENET = ("OMP_NUM_THREADS=1 autoprune bench --models mobilenet_v2 --budgets 0.05 --time-budgets 30m "
             "--seeds 0,2 --methods autoprune,uniform-matched --out results/benchmarks/anytime/mobilenet_v2-30m-a "
             "(and the other 30 and 10 minute commands in docs/benchmarks.md, into mobilenet_v2-30m-b to -f); "
             "rows merged here")
RESNET = ("OMP_NUM_THREADS=1 autoprune bench --models resnet18 --budgets 0.02 --seeds 0,1,2 --time-budgets 2m,10m "
          "--methods seed-matched,autoprune,uniform-matched --out results/benchmarks/anytime/resnet18 (and "
          "autoprune-distill and uniform-matched-distill at 10 minutes into resnet18-10m-e to -g, "
          "autoprune-distill and uniform-matched at 30 minutes into resnet18-30m-j and -l, docs/benchmarks.md); "
          "rows merged here")
COMMANDS = {"resnet18": (RESNET, (120.0, 600.0, 1800.0), 0.02), "mobilenet_v2": (MOBILENET, (120.0, 600.0, 1800.0), 0.05)}


def raced(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows made when autoprune raced at every budget: from 10 minutes on that is ``autoprune-race`` now."""
    if frame.empty:
        return frame
    frame.loc[(frame["method"] == "autoprune") & (frame["time_budget"] >= 600.0), "method"] = "autoprune-race"
    return frame


def rows(folder: str) -> pd.DataFrame:
    path = root / folder / "bench.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


for model, (command, times, budget) in COMMANDS.items():
    path = root / model / "bench.csv"
    frame = raced(pd.read_csv(path))  # the rows already in the curve were all made at f24e515 or before
    parts = [raced(rows(f)) for f in RACED[model]] + [rows(f) for f in LATER[model]]
    frame = pd.concat([frame, *parts], ignore_index=True).drop_duplicates(KEY, keep="first")
    write_text(path, frame.to_csv(index=False))
    config = BenchConfig(models=(model,), budgets=(budget,), seeds=(0, 1, 2), time_budgets=times, out=root / model,
                         command=command)
    report(frame, config)
    print(model, len(frame), "rows")
