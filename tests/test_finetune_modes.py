"""ThiNet, distillation and soft pruning through the search, from the CLI; the built-in mlp and its sweep."""

import json

import optuna
import pytest
import torch

import autoprune
from autoprune.inputs.task import CLASSIFICATION
from autoprune.train import loop as training
from autoprune.cli import main
from autoprune.inputs.models import build_model
from autoprune.bench.mlp_sweep import FOOTNOTE, format_row, mlp_sweep
from conftest import TINY


def test_builtin_mlp_takes_its_input_size_from_the_data():
    model = build_model("mlp", 10, input_shape=(3, 32, 32))
    assert [m.in_features for m in model if isinstance(m, torch.nn.Linear)] == [3072, 512, 256]
    assert [type(m).__name__ for m in model[1:4]] == ["Linear", "BatchNorm1d", "LeakyReLU"]
    assert build_model("mlp", 10)[1].in_features == 784  # the classic 784-512-256-10
    with pytest.raises(autoprune.AutopruneError, match="no pretrained weights"):
        build_model("mlp", 10, pretrained=True)


@pytest.mark.slow
def test_search_with_thinet_distillation_and_soft_pruning(tmp_path, monkeypatch):
    calls = []

    def recording(model, loader, epochs, device, **kwargs):
        calls.append((kwargs.get("desc"), kwargs.get("distill")))
        return training.train(model, loader, epochs, device, **kwargs)

    for module in ("study.trials", "export.final", "train.soft"):
        monkeypatch.setattr(f"autoprune.{module}.train", recording)
    out = tmp_path / "run"
    assert main(["search", "--model", f"{TINY}:tiny_resnet", "--budget", "flops=0.5", "--trials", "2",
                 "--train-epochs", "3", "--finetune-epochs", "0.25", "--final-epochs", "0.5", "--grid", "0.5",
                 "--importance", "thinet", "--distill", "--distill-weight", "0.7", "--temperature", "3",
                 "--soft-epochs", "1", "--quiet", "--out", str(out)]) == 0
    descs = [desc for desc, _ in calls]
    assert descs == ["trial 0", "trial 1", "soft pruning", "final fine-tune"]
    for _, distill in calls:  # the unpruned base teaches in trials, soft pruning and the final fine-tune
        assert distill is not None and (distill.weight, distill.temperature) == (0.7, 3.0)
        assert isinstance(distill.teacher, torch.nn.Module)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["importance"] == "soft-l2" and plan["meta"]["selected_by"] == "thinet"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flops"] <= 0.5 * summary["base_flops"] and summary["soft_epochs"] == 1.0
    study = optuna.load_study(study_name="tiny_models-digits-flops0.5", storage=f"sqlite:///{out / 'study.db'}")
    config = study.user_attrs["config"]
    assert config["importance"] == "thinet" and "0.7" in config["distill"]
    rebuilt = autoprune.load_pruned(out)  # soft pruning's channels, not the search's, are the ones kept
    model = torch.load(out / "model.pt", weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_bad_fine_tune_options_are_one_line_errors(capsys):
    assert main(["search", "--distill", "--distill-weight", "2", "--quiet"]) == 2
    assert main(["search", "--distill-weight", "2", "--quiet"]) == 2  # the default may distill: checked too
    assert main(["search", "--granularity", "weight", "--soft-epochs", "1", "--budget", "params=0.3"]) == 2
    err = capsys.readouterr().err
    assert "distillation weight must lie in [0, 1]" in err and "--soft-epochs prunes channels" in err


@pytest.mark.slow
def test_mlp_sweep_compares_uniform_pruning_with_the_search(digits_data):
    rows = mlp_sweep(digits_data, levels=(0.5, 0.97), train_epochs=2, finetune_epochs=0.25, trials=2, quiet=True)
    row = rows[0]
    assert rows[1].search_nonzero_share <= rows[1].nonzero_share + 1e-9  # beyond the default 95 % cap too
    assert abs(row.nonzero_share - (1 - 0.5 * 0.99)) < 0.02  # nearly every parameter is a weight
    assert row.search_nonzero_share <= row.nonzero_share + 1e-9
    assert row.base > 0.5 and row.drop == row.pruned - row.base
    assert "50%" in format_row(row) and "thop counts dense" in FOOTNOTE


def test_a_fine_tune_by_the_clock_trains_until_its_time_is_up_on_a_cosine_of_the_time():
    """``train(seconds=)`` (a time budget's final fine-tune) ignores epochs and anneals to zero."""
    from torch.utils.data import DataLoader, TensorDataset

    from tiny_models import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet(10, width=8)
    loader = DataLoader(TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))), batch_size=16)
    rates, steps = [], []
    optimizers = []
    real_sgd = torch.optim.SGD

    def spy(*args, **kwargs):  # the optimiser the fine-tune makes, to read its learning rate after each step
        optimizers.append(real_sgd(*args, **kwargs))
        return optimizers[-1]

    def after(_):
        steps.append(1)
        rates.append(optimizers[-1].param_groups[0]["lr"])

    torch.optim.SGD = spy
    try:
        training.train(model, loader, 0.25, torch.device("cpu"), lr=0.1, quiet=True, after_step=after, seconds=1.0, task=CLASSIFICATION)
        training.train(model, loader, 5.0, torch.device("cpu"), lr=0.1, quiet=True, after_step=after, seconds=0.0, task=CLASSIFICATION)
    finally:
        torch.optim.SGD = real_sgd
    assert len(steps) > len(loader) // 4  # past the quarter epoch asked for: the clock decides
    assert rates[0] <= 0.1 and rates == sorted(rates, reverse=True)  # a cosine falling with the time spent
    assert len(optimizers) == 1  # seconds=0: nothing trained, no optimiser made
