"""Rebuild the chosen plan, fine-tune it longer, test it once, and write it out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .counting import count
from .files import save_torch, write_json
from .plan import Plan
from .study import Problem, Settings
from .training import evaluate, recalibrate_bn, train


def export(problem: Problem, plan: Plan, out: Path, settings: Settings, quiet: bool = False,
           **summary: Any) -> dict[str, Any]:
    """Write ``model.pt``, ``weights.pt``, ``plan.json`` and ``summary.json`` into ``out``.

    ``model.pt`` is the pruned ``nn.Module`` (``torch.load(..., weights_only=False)``);
    ``weights.pt`` its state dict, which with ``plan.json`` rebuilds it through
    :func:`autoprune.load_pruned` without unpickling code. Returns the summary.
    """
    p, s = problem, settings
    data, device = p.data, p.device
    model = p.groups.apply(plan).to(device)
    train_loader = data.loader("train", s.batch_size, shuffle=True, seed=s.seed)
    torch.manual_seed(s.seed)
    recalibrate_bn(model, train_loader, device, s.bn_batches)
    train(model, train_loader, s.final_epochs, device, lr=s.lr, desc="final fine-tune", quiet=quiet)
    val_accuracy = evaluate(model, data.loader("val", 256), device)
    # The test split is read here and nowhere else: once for the base, once for the winner.
    test_loader = data.loader("test", 256)
    base_test = evaluate(p.model, test_loader, device)
    test_accuracy = evaluate(model, test_loader, device)
    cost = count(model, p.groups.example_input)
    base = p.costs.base
    model = model.cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    save_torch(model, out / "model.pt")
    save_torch(model.state_dict(), out / "weights.pt")
    plan.save(out / "plan.json")
    result = {
        "base_flops": base.flops, "base_params": base.params,
        "flops": cost.flops, "params": cost.params,
        "flops_share": cost.flops / base.flops, "params_share": cost.params / base.params,
        "flops_unit": "thop MACs",
        "base_val_accuracy": p.base_val_accuracy, "val_accuracy": val_accuracy,
        "base_test_accuracy": base_test, "test_accuracy": test_accuracy,
        **summary,
    }
    write_json(out / "summary.json", result)
    return result
