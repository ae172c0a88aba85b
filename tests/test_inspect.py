"""pareto, report, export and studies on a small real study (the shared ``tiny_run`` search)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

import autoprune
from autoprune.cli import main
from autoprune.counting import count
from autoprune.cost.timing import latency_ms
from autoprune.export.formats import quantize_dynamic, quantized_layers, state_dict_bytes, to_onnx, to_torchscript
from autoprune.report.pareto import non_dominated, pareto_front
from autoprune.study.runs import list_studies, open_run
from autoprune.study.trials import trial_plan
from conftest import TINY_STUDY
from tiny_models import mlp

PNG = b"\x89PNG\r\n\x1a\n"


def _where(run_dir):
    return ["--study", TINY_STUDY, "--run-dir", str(run_dir)]


def test_non_dominated_keeps_only_points_nothing_beats():
    frame = pd.DataFrame({"val_accuracy": [0.9, 0.9, 0.8, 0.95, 0.95],
                          "flops": [10, 10, 5, 12, 12], "params": [3, 4, 3, 4, 5]})
    # row 1 loses to row 0 on params; row 4 to row 3 on params; the rest trade off.
    assert non_dominated(frame).tolist() == [True, False, True, True, False]
    # Only rows in ``among`` compete: without row 0, row 1 is no longer beaten.
    assert non_dominated(frame, np.array([False, True, True, True, True])).tolist()[1]


def test_pareto_table_files_and_the_front_are_right(tiny_run, tmp_path, capsys):
    csv, js = tmp_path / "front.csv", tmp_path / "front.json"
    assert main(["pareto", *_where(tiny_run), "--csv", str(csv), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "FLOPs (thop MACs)" in printed and "params share" in printed
    front = pd.read_csv(csv)
    pd.testing.assert_frame_equal(front, pd.DataFrame(json.loads(js.read_text())), check_dtype=False)
    study = optuna.load_study(study_name=TINY_STUDY, storage=f"sqlite:///{tiny_run / 'study.db'}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = {t.number: (t.value, t.user_attrs["flops"], t.user_attrs["params"]) for t in trials}
    budget = 0.4 * front["flops"].iloc[0] / front["flops_share"].iloc[0]

    def beaten(n):
        a, f, p = points[n]
        return any(a2 >= a and f2 <= f and p2 <= p and (a2, f2, p2) != (a, f, p)
                   for a2, f2, p2 in points.values())

    assert set(front["trial"]) == {n for n in points if not beaten(n) and points[n][1] <= budget}
    assert front["val_accuracy"].iloc[0] == study.best_value  # sorted, most accurate first
    assert (front["flops_share"] <= 0.4).all() and (front["params_share"] < 1).all()


def _optuna_best_trials(study, url):
    optuna_cli = Path(sys.executable).with_name("optuna")
    if not optuna_cli.is_file():
        pytest.skip("optuna's command line is not installed next to this Python")
    result = subprocess.run([str(optuna_cli), "best-trials", "--study-name", study, "--storage", url, "-f", "json"],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_optuna_best_trials_shows_the_best_and_on_the_copy_the_whole_front(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("*.pt"))
    url = f"sqlite:///{run_dir / 'study.db'}"
    front = pareto_front(open_run(TINY_STUDY, run_dir=run_dir))
    # The search study has one objective: Optuna's best trial is the top of the front.
    shown = _optuna_best_trials(TINY_STUDY, url)
    assert [row["number"] for row in shown] == [int(front["trial"].iloc[0])] and set(shown[0]["value"]) == {"val_accuracy"}
    assert main(["pareto", "--study", TINY_STUDY, "--run-dir", str(run_dir), "--optuna-study"]) == 0
    copied = _optuna_best_trials(TINY_STUDY + "-front", url)
    assert sorted(row["user_attrs"]["search_trial"] for row in copied) == sorted(front["trial"])
    assert set(copied[0]["values"]) == {"val_accuracy", "flops", "params"}
    assert TINY_STUDY + "-front" not in set(list_studies(url)["study"])  # the copy is not a study to list
    with pytest.raises(autoprune.AutopruneError, match="not made by autoprune search"):
        open_run(TINY_STUDY + "-front", run_dir=run_dir)


def test_report_writes_real_images_and_a_markdown_that_shows_them(tiny_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", *_where(tiny_run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for name in ("front.png", "sensitivity.png", "channels.png", "history.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
        image = __import__("matplotlib.image").image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.05, name  # not blank
        assert f"]({name})" in text
    assert "FLOPs (thop MACs)" in text and "Pareto front" in text and "budget `flops=0.4`" in text
    assert "test accuracy" in text  # the search exported the best trial: its test result is shown


def test_report_without_the_run_directory_still_plots_the_study(tiny_run, tmp_path):
    out = tmp_path / "report"
    url = f"sqlite:///{tiny_run / 'study.db'}"
    assert main(["report", "--study", TINY_STUDY, "--storage", url, "--run-dir", str(tmp_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["channels.png", "front.png", "history.png"]
    assert "sensitivity.png" not in (out / "report.md").read_text()


def test_a_copy_that_disagrees_with_the_model_is_refused(tmp_path):
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    # Captured on the first two rows (sum > 0), checked on all four (sum < 0): the copy must be refused.
    inputs = torch.tensor([[1.0, 1, 1], [1, 1, 1], [-10, -10, -10], [-10, -10, -10]])
    for write in (to_onnx, to_torchscript):
        with pytest.raises(autoprune.AutopruneError, match="could not|does not reproduce"):
            write(Branchy(), inputs, tmp_path / "m")


def test_export_writes_checked_formats_latency_and_an_int8_copy(tiny_run, tmp_path, capsys):
    out = tmp_path / "export"
    args = ["export", *_where(tiny_run), "--out", str(out), "--final-epochs", "0.5", "--format", "onnx",
            "--format", "torchscript", "--quantize", "dynamic", "--repeats", "3", "--latency-batch", "8",
            "--quiet"]
    assert main(args) == 0
    assert "CPU latency base" in capsys.readouterr().out
    assert {f.name for f in out.iterdir()} == {  # self-contained files, nothing else left behind
        "model.pt", "weights.pt", "plan.json", "summary.json", "model.onnx", "model.torchscript.pt",
        "model-int8.pt", "weights-int8.pt"}
    summary = json.loads((out / "summary.json").read_text())
    study = optuna.load_study(study_name=TINY_STUDY, storage=f"sqlite:///{tiny_run / 'study.db'}")
    assert summary["trial"] == study.best_trial.number
    assert autoprune.Plan.load(out / "plan.json").kept == trial_plan(study.best_trial).kept  # rebuilt from its plan
    model = torch.load(out / "model.pt", weights_only=False)
    assert count(model, torch.zeros(1, 3, 32, 32)).flops == summary["flops"] <= 0.4 * summary["base_flops"]
    x = torch.randn(5, 3, 32, 32)  # another batch size than the file was exported with
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(autoprune.load_pruned(out)(x), want)
        torch.testing.assert_close(torch.jit.load(str(out / "model.torchscript.pt"))(x), want)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], want.numpy(), atol=1e-4, rtol=1e-4)
    assert summary["onnx"]["max_abs_diff"] < 1e-4
    for name in ("base", "pruned", "quantized"):
        assert set(summary["latency_ms"][name]) == {"1", "8"} and min(summary["latency_ms"][name].values()) > 0
    q = summary["quantized"]
    assert q["quantized_layers"] == 1  # the classifier runs int8; convolutions have no dynamic kernel
    assert abs(q["test_accuracy"] - summary["test_accuracy"]) <= 0.03  # int8 costs (almost) nothing
    int8 = torch.load(out / "model-int8.pt", weights_only=False)
    torch.testing.assert_close(int8(x), want, atol=0.1 * want.abs().max().item(), rtol=0)


def test_given_only_its_storage_export_finds_the_run_folder_from_anywhere(tiny_run, tmp_path, monkeypatch):
    """The study records its run folder, so export (pareto, report) given only --storage find base.pt and
    sensitivity.csv from another folder; a folder moved since (or an older study's, which recorded none)
    is the folder of its storage file, where its run.json names the study."""
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tiny_run / 'study.db'}"
    assert open_run(TINY_STUDY, storage).folder == tiny_run
    assert main(["export", "--study", TINY_STUDY, "--storage", storage, "--out", "exp", "--final-epochs", "0.05",
                 "--repeats", "1", "--latency-batch", "2", "--quiet"]) == 0
    assert (tmp_path / "exp" / "model.pt").is_file() and not (tmp_path / "results").exists()
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved)
    optuna.load_study(study_name=TINY_STUDY, storage=f"sqlite:///{moved / 'study.db'}").set_user_attr(
        "run_folder", str(tmp_path / "gone"))
    assert open_run(TINY_STUDY, f"sqlite:///{moved / 'study.db'}").folder == moved


def test_an_int8_copy_runs_and_is_smaller(tmp_path):
    torch.manual_seed(0)
    model = mlp(10).eval()  # Linear layers: what dynamic quantization converts
    int8 = quantize_dynamic(model)
    assert quantized_layers(int8) == 3 and quantized_layers(model) == 0
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(int8(x), model(x), atol=0.05, rtol=0.05)
    assert state_dict_bytes(int8, tmp_path / "q.pt") < 0.4 * state_dict_bytes(model, tmp_path / "f.pt")
    timed = latency_ms({"float": model, "int8": int8}, x.shape[1:], (1, 4), repeats=2)
    assert set(timed) == {"float", "int8"} and set(timed["int8"]) == {"1", "4"}


def test_studies_lists_the_study_from_results_and_from_a_storage(tiny_run, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copytree(tiny_run, results / TINY_STUDY, ignore=shutil.ignore_patterns("*.pt"))
    table = list_studies(root=results)
    row = table.set_index("study").loc[TINY_STUDY]
    assert row["budget"] == "flops=0.4" and row["complete"] >= 3 and 0 < row["best_val_accuracy"] <= 1
    monkeypatch.chdir(tmp_path)  # the default: results/*/study.db, and results/NAME for --study
    assert main(["studies"]) == 0
    assert TINY_STUDY in capsys.readouterr().out
    assert main(["pareto", "--study", TINY_STUDY]) == 0
    assert main(["studies", "--storage", f"sqlite:///{results / TINY_STUDY / 'study.db'}"]) == 0
    assert "flops=0.4" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["pareto", "--study", "nope"], "no study database at results/nope/study.db"),
    (["pareto", "--study", "nope", "--run-dir", "RUN"], "no study 'nope' in"),
    (["export", "--study", TINY_STUDY, "--run-dir", "RUN", "--trial", "99"], "has no finished trial 99"),
    (["studies", "--storage", "sqlite:///typo.db"], "storage sqlite:///typo.db does not exist"),
    (["export", "--study", TINY_STUDY, "--run-dir", "RUN", "--format", "onnx", "--repeats", "0"], "at least one repeat"),
    (["report", "--study", TINY_STUDY, "--run-dir", "RUN", "--trial", "99"], "has no finished trial 99"),
])
def test_inspect_mistakes_get_one_line(args, message, tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(tiny_run) if a == "RUN" else a for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autoprune: error:") and message in err and "\n" not in err
