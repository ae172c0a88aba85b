"""`autoprune bench --quick` end to end, on the small residual model."""

import pandas as pd
import pytest

from autoprune.bench.equal_time import DEFAULT_METHODS as METHODS
from autoprune.cli import main
from conftest import TINY


@pytest.mark.slow  # --quick still gives each searched method a 20 s time budget, by design
def test_bench_quick_writes_every_method_within_budget(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--models", f"{TINY}:tiny_resnet", "--budgets", "0.4",
                 "--out", str(out), "--quiet"]) == 0
    rows = pd.read_csv(out / "bench.csv")
    assert sorted(rows["method"]) == sorted(METHODS)
    measured = rows.dropna(subset=["test_accuracy"])
    assert len(measured) >= len(METHODS) - 1  # global ranking may be unable to reach a budget
    assert (measured["flops_share"] <= 0.4 + 1e-9).all()
    searched = measured[measured["method"].isin(["autoprune", "random"])]
    assert searched["trials"].between(1, 3).all()  # planned by the time budget, capped by --trials
    assert (searched["time_budget"] == 20).all() and (measured["base_test_accuracy"] > 0.1).all()
    # uniform-matched trains for as long as the autoprune run took, so longer than the floor's fine-tune.
    by = measured.set_index("method")
    assert by.loc["uniform-matched", "final_epochs"] > by.loc["uniform", "final_epochs"]
    assert by.loc["uniform-matched", "note"].startswith(f"{by.loc['autoprune', 'wall_seconds']:.0f}s of autoprune")
    text = (out / "BENCHMARKS.md").read_text()
    assert "autoprune bench --quick" in text and "Spearman" in text and "Equal wall time" in text
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proxies = pd.read_csv(out / "proxies.csv")  # one row per random plan, each within the budget
    assert len(proxies) == 4 and (proxies["flops_share"] <= 0.4 + 1e-9).all()
    assert proxies[["bn_score", "score_0.5ep", "converged"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (proxies["kd_loss"] >= 0).all() and "Which cheap score ranks candidates?" in text

    # A rerun resumes: nothing is measured again.
    assert main(["bench", "--quick", "--models", f"{TINY}:tiny_resnet", "--budgets", "0.4",
                 "--out", str(out), "--quiet"]) == 0
    assert len(pd.read_csv(out / "bench.csv")) == len(rows)
