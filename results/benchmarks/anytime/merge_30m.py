"""Merge the 30 min mobilenet_v2 rows into the curve, name the raced rows, re-render both reports (run once)."""
from pathlib import Path

import pandas as pd

from autoprune.bench.equal_time import BenchConfig, report
from autoprune.files import write_text

root = Path("results/benchmarks/anytime")  # run from the repository root
COMMANDS = {
    "resnet18": ("OMP_NUM_THREADS=1 autoprune bench --models resnet18 --budgets 0.02 --seeds 0,1,2 --time-budgets 2m,10m "
                 "--methods seed-matched,autoprune,uniform-matched --out results/benchmarks/anytime/resnet18", (120.0, 600.0), 0.02),
    "mobilenet_v2": ("OMP_NUM_THREADS=1 autoprune bench --models mobilenet_v2 --budgets 0.05 --time-budgets 30m "
                     "--seeds 0,2 --methods autoprune,uniform-matched --out results/benchmarks/anytime/mobilenet_v2-30m-a "
                     "(and -b: --seeds 1, then --seeds 0,1 --methods seed-matched); rows merged here",
                     (120.0, 600.0, 1800.0), 0.05),
}
for model, (command, times, budget) in COMMANDS.items():
    path = root / model / "bench.csv"
    frame = pd.read_csv(path)
    if model == "mobilenet_v2" and not (frame["time_budget"] == 1800.0).any():
        frame = pd.concat([frame] + [pd.read_csv(root / f"mobilenet_v2-30m-{s}" / "bench.csv") for s in "ab"],
                          ignore_index=True)
    raced = (frame["method"] == "autoprune") & (frame["time_budget"] >= 600.0)
    frame.loc[raced, "method"] = "autoprune-race"  # made at f24e515, where autoprune raced at every budget
    write_text(path, frame.to_csv(index=False))
    config = BenchConfig(models=(model,), budgets=(budget,), seeds=(0, 1, 2), time_budgets=times, out=root / model,
                         command=command)
    report(frame, config)
    print(model, len(frame), "rows;", int(raced.sum()), "renamed")
