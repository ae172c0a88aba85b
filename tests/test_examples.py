"""The worked examples (examples/), run as the README runs them, on their tiny sizes.

Each one goes through the real command: model, data and task from the example's one file, a budget
met as thop counts the exported model, the score named in what the command prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
EXAMPLES = {  # file, tiny-size switch, score
    "segmentation": ("examples/segmentation/fmnist_seg.py", "FMNIST_SEG_SMALL", "mIoU"),
    "detection": ("examples/detection/fmnist_det.py", "FMNIST_DET_SMALL", "mAP@0.5"),
}


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_from_the_readme_command_and_meets_its_budget(name, tmp_path):
    path, switch, score = EXAMPLES[name]
    out = tmp_path / "run"
    args = ["search", "--model", f"{path}:model", "--dataset", f"{path}:data", "--task", f"{path}:task",
            "--budget", "flops=0.5", "--train-epochs", "1", "--trials", "2", "--finetune-epochs", "0.5",
            "--final-epochs", "0.5", "--grid", "0.5", "--device", "cpu", "--out", str(out), "--quiet"]
    env = {**os.environ, switch: "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "autoprune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"test {score}" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"] == score and 0.0 <= summary["test_accuracy"] <= 1.0
    assert 0.485 <= summary["flops_share"] <= 0.5  # thop on the exported model, against the base
    model = torch.load(out / "model.pt", weights_only=False).eval()
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in torch.load(out / "base.pt", weights_only=True).values() if p.is_floating_point())
