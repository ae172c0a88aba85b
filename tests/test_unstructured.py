"""Weight-level pruning: masks, nonzero counting, the budget projection, sparse export, end to end."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.inputs.task import CLASSIFICATION
from autoprune.cli import main
from autoprune.counting import count
from autoprune.errors import AutopruneError
from autoprune.train.loop import train
from autoprune.study.weights import (MaskHook, WeightCosts, count_nonzero, dense_state, magnitude_masks,
                                    project_sparsities, prune_weights, sizes, sparse_state, weight_limit)
from conftest import TINY
from tiny_models import mlp


def _loader(n=64):
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))), batch_size=16)


def test_masks_keep_the_largest_weights_per_layer():
    torch.manual_seed(0)
    model = mlp()
    masks = magnitude_masks(model, {"1": 0.75, "4": 0.5})
    weight = model[1].weight.abs()
    assert masks["1"].sum() == round(weight.numel() * 0.25)
    assert weight[masks["1"]].min() >= weight[~masks["1"]].max()  # a per-layer percentile threshold
    assert masks["4"].float().mean() == 0.5


def test_pruned_weights_stay_exactly_zero_through_fine_tuning():
    pruned, masks = prune_weights(mlp(), {"1": 0.8, "4": 0.5, "7": 0.3})
    zeros = {n: (dict(pruned.named_modules())[n].weight == 0) for n in masks}
    free = train(prune_weights(mlp(), {"1": 0.8})[0], _loader(), 1, torch.device("cpu"), lr=0.1, quiet=True, task=CLASSIFICATION)
    assert (free[1].weight != 0).float().mean() > 0.9  # without the hook, weight decay and SGD revive them
    train(pruned, _loader(), 2, torch.device("cpu"), lr=0.1, quiet=True, after_step=MaskHook(masks), task=CLASSIFICATION)
    for name, was_zero in zeros.items():
        weight = dict(pruned.named_modules())[name].weight
        assert torch.all(weight[was_zero] == 0), name
        assert torch.any(weight[~was_zero] != 0)


def test_nonzero_count_sees_what_thop_does_not():
    model = mlp()
    pruned, masks = prune_weights(model, {"1": 0.5})
    removed = int((~masks["1"]).sum())
    assert count_nonzero(model) - count_nonzero(pruned) == removed
    assert count(pruned, torch.zeros(1, 3, 32, 32)).params == count(model, torch.zeros(1, 3, 32, 32)).params
    costs = WeightCosts.of(model)
    assert costs.base == count_nonzero(model)
    assert costs.nonzero(np.array([0.5, 0.0, 0.0])) == count_nonzero(pruned)


def test_projection_fills_the_nonzero_budget_and_refuses_the_impossible():
    costs = WeightCosts.of(mlp())
    limit = 0.3 * costs.base
    sparsities = project_sparsities(costs, np.array([0.9, 0.1, 0.1]), limit, 0.95)
    assert 0.995 * limit <= costs.nonzero(sparsities) <= limit
    assert sparsities[0] > sparsities[1]  # the proposal's proportions survive the scaling
    with pytest.raises(AutopruneError, match=r"ask for at least params=0.101"):
        project_sparsities(costs, np.zeros(3), 0.01 * costs.base, 0.9)


def test_weight_budget_caps_nonzero_params_only():
    costs = WeightCosts.of(mlp())
    assert weight_limit("params=0.25", costs) == 0.25 * costs.base
    with pytest.raises(AutopruneError, match="nonzero params only"):
        weight_limit("flops=0.3", costs)


def test_sparse_format_round_trips_and_is_smaller():
    pruned, _ = prune_weights(mlp(), {"1": 0.9, "4": 0.9})
    restored = mlp()
    restored.load_state_dict(dense_state(sparse_state(pruned)))
    for key, value in pruned.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    measured = sizes(pruned)
    assert measured["sparse_bytes"] < 0.35 * measured["dense_bytes"]


def test_weight_search_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--model", f"{TINY}:mlp", "--granularity", "weight", "--budget", "params=0.2",
                 "--trials", "2", "--train-epochs", "3", "--finetune-epochs", "0.25", "--final-epochs", "0.5",
                 "--grid", "0.5,0.9", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    model = torch.load(out / "model.pt", weights_only=False)
    assert count_nonzero(model) == summary["nonzero_params"] <= 0.2 * summary["base_params"]
    assert summary["nonzero_params"] >= 0.19 * summary["base_params"]  # the budget is used
    assert summary["model_sparse_bytes"] < summary["model_dense_bytes"]
    assert summary["test_accuracy"] > 0.5 and "thop counts dense" in summary["nonzero_unit"]
    rebuilt = autoprune.load_pruned(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    saved = torch.load(out / "weights_sparse.pt", weights_only=True)
    rebuilt.load_state_dict(dense_state(saved))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert main(["search", "--model", f"{TINY}:mlp", "--granularity", "weight", "--budget", "flops=0.2",
                 "--quiet", "--out", str(tmp_path / "bad")]) == 2
