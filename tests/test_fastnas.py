"""`autoprune bench --methods fastnas`: NVIDIA ModelOpt's FastNAS as a peer row (autoprune/bench/fastnas.py)."""

import importlib.util
import math
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from autoprune.bench import fastnas
from autoprune.cli import main
from autoprune.counting import Cost, count
from conftest import TINY


needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason='nvidia-modelopt is not installed (pip install "autoprune[bench-peers]")')


def test_fastnas_without_modelopt_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "modelopt.torch.prune", None)  # as if it were not installed
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--models", f"{TINY}:tiny_resnet", "--methods", "uniform,fastnas",
                 "--out", str(out), "--quiet"]) == 2
    line = 'autoprune: error: fastnas needs nvidia-modelopt: pip install "autoprune[bench-peers]"\n'
    assert capsys.readouterr().err == line
    assert not out.exists()  # refused before the base model was trained


def test_search_to_budget_meets_thop_budget_on_a_step_function(monkeypatch):
    """FastNAS's count is not thop's, and its subnets jump in steps: the correction loop ends with the
    largest subnet within the budget as thop counts it, never one over it."""
    base, goal = 1000.0, 300.0
    steps = [(0.0, 0.04), (0.24, 0.27), (0.33, 0.36), (0.5, 0.55), (1.0, 1.0)]  # FastNAS share -> thop share

    class Fake:
        def __init__(self, problem, seed, folder):
            self.scored, self.searches = 10, 0

        def search(self, share):
            self.searches += 1
            got = max(t for s, t in steps if s <= share)
            return SimpleNamespace(got=got), share

    monkeypatch.setattr(fastnas, "_Searcher", Fake)
    monkeypatch.setattr(fastnas, "count", lambda model, example: Cost(model.got * base, 1.0))
    problem = SimpleNamespace(limits=Cost(goal, math.inf), costs=SimpleNamespace(base=Cost(base, 1.0)),
                              groups=SimpleNamespace(example_input=None))
    model, cost, info = fastnas.search_to_budget(problem, 0, None)
    assert cost.flops == 270.0 and model.got == 0.27  # the next step up, 0.36, is over
    assert info["counted"] == info["share"]  # FastNAS's own count of the subnet kept, not of the last one searched
    assert len(info["shares"]) == info["searches"] <= fastnas.SEARCHES
    assert {got for _, got in info["shares"]} <= {0.27, 0.36}  # asked near the budget, not far off

    steps[:] = [(0.0, 0.5)]  # FastNAS's smallest subnet is over the budget as thop counts it
    with pytest.raises(Exception, match="no subnet within the budget as thop counts it"):
        fastnas.search_to_budget(problem, 0, None)


@pytest.mark.slow
@needs_modelopt
def test_fastnas_row_on_the_tiny_model(tmp_path, monkeypatch):
    found = []
    search = fastnas.search_to_budget

    def keep(*args, **kwargs):
        found.append(search(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(fastnas, "search_to_budget", keep)
    monkeypatch.setattr(fastnas, "SEARCHES", 2)  # the first one fits at this budget; the second tries closer
    monkeypatch.setattr(fastnas, "BN_BATCHES", 4)  # the digits' training split is 19 batches
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--models", f"{TINY}:tiny_resnet", "--budgets", "0.4", "--methods", "fastnas",
                 "--time-budget", "40", "--train-epochs", "6", "--rank-plans", "0", "--out", str(out), "--quiet"]) == 0
    row = pd.read_csv(out / "bench.csv").set_index("method").loc["fastnas"]
    assert 0 < row["flops_share"] <= 0.4 and 0 < row["params_share"] < 1 and 0 <= row["test_accuracy"] <= 1
    assert row["trials"] > 0 and row["time_budget"] == 40 and "FastNAS" in row["note"]
    if "no time left to fine-tune" in row["note"]:  # the search took the whole time budget (a loaded machine)
        assert row["final_epochs"] == 0
    else:  # the rest of the time budget was fine-tuned by the clock
        assert row["final_epochs"] > 0 and row["wall_seconds"] == pytest.approx(40, abs=5)
    model, cost, _ = found[0]  # the fine-tuned model (trained in place), counted again by thop
    images = torch.rand(4, 3, 32, 32)
    again = count(model, images[:1])
    assert again.flops == row["flops"] == cost.flops and again.flops <= 0.4 * count(_base(), images[:1]).flops
    assert model.eval()(images).shape == (4, 10)
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())


def _base() -> nn.Module:
    from tiny_models import tiny_resnet

    return tiny_resnet(10)
