"""`autoprune bench --quick` end to end, on the small residual model."""

import pandas as pd

from autoprune.bench import DEFAULT_METHODS as METHODS
from autoprune.cli import main
from conftest import TINY


def test_bench_quick_writes_every_method_within_budget(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--models", f"{TINY}:tiny_resnet", "--budgets", "0.4",
                 "--out", str(out), "--quiet"]) == 0
    rows = pd.read_csv(out / "bench.csv")
    assert sorted(rows["method"]) == sorted(METHODS)
    measured = rows.dropna(subset=["test_accuracy"])
    assert len(measured) >= len(METHODS) - 1  # global ranking may be unable to reach a budget
    assert (measured["flops_share"] <= 0.4 + 1e-9).all()
    assert (measured.loc[measured["method"].isin(["autoprune", "random"]), "trials"] == 3).all()
    matched = measured[measured["method"] == "uniform-matched"]["final_epochs"].iloc[0]
    assert matched > measured[measured["method"] == "uniform"]["final_epochs"].iloc[0]
    text = (out / "BENCHMARKS.md").read_text()
    assert "autoprune bench --quick" in text and "Spearman" in text
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranking = pd.read_csv(out / "ranking.csv")
    assert ranking["plans"].iloc[0] == 4 and -1 <= ranking["spearman"].iloc[0] <= 1

    # A rerun resumes: nothing is measured again.
    assert main(["bench", "--quick", "--models", f"{TINY}:tiny_resnet", "--budgets", "0.4",
                 "--out", str(out), "--quiet"]) == 0
    assert len(pd.read_csv(out / "bench.csv")) == len(rows)
