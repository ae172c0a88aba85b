"""A user's own task, end to end: dense prediction, a detector-shaped model, a regression.

Each search trains the base on the task's loss, scores with the task's score, meets its budget as thop
counts the exported model, and hands back a model that still runs with outputs of the same shape.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import autoprune
import user_tasks
from autoprune.counting import count
from autoprune.inputs.data import from_splits
from autoprune.inputs.task import CLASSIFICATION, Task, load_task, shape_signature, to_device

TASKS = str(Path(user_tasks.__file__))
FAST = dict(trials=2, train_epochs=3, finetune_epochs=0.3, final_epochs=0.5, grid=(0.5,), quiet=True,
            device="cpu", lr=0.05)
CASES = {  # model, data, task, budget
    "segmentation": (user_tasks.segmenter, user_tasks.segmentation_data, user_tasks.segmentation, "flops=0.5"),
    "detection": (user_tasks.detector, user_tasks.detection_data, user_tasks.detection, "flops=0.5"),
    "regression": (user_tasks.regressor, user_tasks.regression_data, user_tasks.regression, "params=0.5"),
}


@pytest.mark.parametrize("name", CASES)
def test_search_on_a_users_task_meets_the_budget_and_scores_with_the_task(name, tmp_path):
    make_model, make_data, make_task, budget = CASES[name]
    torch.manual_seed(0)
    task = make_task()
    base = make_model()
    result = autoprune.search(base, make_data(), budget, task=task, out=tmp_path, **FAST)
    s = result.summary
    data = from_splits("user", *make_data(), task=task)
    example = data.example_input()
    # The budget, as thop counts the exported model against the trained base.
    before, after = count(base, example), count(result.model, example)
    key = budget.split("=")[0]
    assert getattr(after, key) <= 0.5 * getattr(before, key) * 1.0001
    assert s[f"{key}_share"] == pytest.approx(getattr(after, key) / getattr(before, key))
    # The pruned model runs on the task's inputs and keeps its outputs' shape.
    with torch.no_grad():
        assert shape_signature(result.model.eval()(example)) == shape_signature(base.eval()(example))
    # The score is the task's: its name beside the values, and the test value is the task's own score.
    assert s["score"] == task.name and s["score_format"] == task.format
    assert s["test_accuracy"] == pytest.approx(task.evaluate(result.model, data.loader("test"), torch.device("cpu")))
    assert result.study.user_attrs["score"]["name"] == task.name
    assert math.isfinite(s["trial_val_accuracy"])
    if name == "regression":
        assert s["test_accuracy"] < 0 and s["base_test_accuracy"] < 0  # minus an error
    assert json.loads((tmp_path / "summary.json").read_text())["score"] == task.name


def test_a_users_loaders_are_kept_as_built():
    train, val, test = user_tasks.detection_data()
    data = from_splits("user", train, val, test, task=user_tasks.detection())
    assert data.loader("train", 64, shuffle=True) is train and data.loader("val", 256) is val
    score = data.loader("score", 256)
    assert score.batch_size == val.batch_size and score.collate_fn is val.collate_fn
    assert isinstance(data.example_input(), list) and data.input_shape == (3, 24, 24)


def test_cli_search_export_pareto_and_report_with_a_task_file(tmp_path, capsys):
    from autoprune.cli import main

    out = tmp_path / "run"
    args = ["search", "--model", f"{TASKS}:segmenter", "--dataset", f"{TASKS}:segmentation_data",
            "--task", f"{TASKS}:segmentation", "--budget", "flops=0.3..0.7", "--trials", "3", "--train-epochs", "3",
            "--finetune-epochs", "0.3", "--final-epochs", "0.3", "--grid", "0.5", "--device", "cpu",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test mIoU" in printed and "accuracy" not in printed
    storage = f"sqlite:///{out / 'study.db'}"
    study = json.loads((out / "summary.json").read_text())["study"]
    assert main(["pareto", "--study", study, "--storage", storage]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["report", "--study", study, "--storage", storage, "--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "val mIoU" in html
    # export finds the task file from the study: no --task needed.
    assert main(["export", "--study", study, "--storage", storage, "--final-epochs", "0.2", "--repeats", "2",
                 "--latency-batch", "2", "--out", str(tmp_path / "exported"), "--quiet"]) == 0
    assert "test mIoU" in capsys.readouterr().out
    rebuilt = autoprune.load_pruned(tmp_path / "exported")
    assert rebuilt(torch.zeros(1, 3, 16, 16))["out"].shape == (1, 3, 16, 16)


def test_load_task_takes_a_task_a_factory_or_classification():
    assert load_task(None) is CLASSIFICATION
    task = load_task(f"{TASKS}:regression")
    assert isinstance(task, Task) and task.name == "-MAE" and task.spec == f"{TASKS}:regression"
    with pytest.raises(autoprune.AutopruneError, match="returned dict, not an autoprune.Task"):
        load_task(f"{TASKS}:not_a_task")
    with pytest.raises(autoprune.AutopruneError, match="has no 'nope'"):
        load_task(f"{TASKS}:nope")


def test_task_checks_its_loss_and_score():
    model = user_tasks.regressor()
    batch = next(iter(torch.utils.data.DataLoader(user_tasks.regression_data()[1], batch_size=8)))
    with pytest.raises(autoprune.AutopruneError, match="returned a tensor of shape"):
        user_tasks.vector_loss().batch_loss(model, batch)
    with pytest.raises(autoprune.AutopruneError, match="returned nan"):
        user_tasks.nan_score().evaluate(model, [batch], torch.device("cpu"))
    assert to_device([batch[0], {"y": batch[1]}], torch.device("cpu"))[1]["y"] is batch[1]


def test_recalibration_stops_each_forward_once_every_batchnorm_has_its_statistics():
    from autoprune.train.loop import recalibrate_bn

    class Counting(torch.nn.Module):  # a head (a detector's NMS) the statistics do not need
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return x

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), Counting())
    batches = [(torch.randn(8, 3, 6, 6) + 2.0, None)] * 3
    recalibrate_bn(model, batches, torch.device("cpu"), 3, task=CLASSIFICATION)
    assert Counting.calls == 0 and not model[1].training
    with torch.no_grad():
        assert torch.allclose(model[1].running_mean, model[0](batches[0][0]).mean((0, 2, 3)), atol=1e-5)
