"""End to end through the command line: digits, a small residual model, a handful of trials."""

import json
import os
import shutil
import subprocess
import sys

import optuna
import pytest
import torch

import autoprune
from autoprune.cli import main
from autoprune.counting import count
from conftest import SEARCH_ARGS

ARGS = SEARCH_ARGS


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The shared search, to read only (other test modules assert on it too)."""
    return tiny_run


@pytest.fixture
def own_run(tiny_run, tmp_path):
    """A copy of the shared search for a test that runs it again."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def test_search_writes_a_pruned_model_within_budget(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("base_flops", "base_params", "flops", "params", "budget", "base_val_accuracy", "val_accuracy",
                "base_test_accuracy", "test_accuracy", "trial", "seconds", "command", "versions"):
        assert key in summary, key
    model = torch.load(run_dir / "model.pt", weights_only=False)
    measured = count(model, torch.zeros(1, 3, 32, 32))
    assert measured.flops == summary["flops"] <= 0.4 * summary["base_flops"]
    assert measured.flops >= 0.97 * 0.4 * summary["base_flops"]  # the budget is used, not wasted
    assert summary["base_test_accuracy"] > 0.8 and summary["test_accuracy"] > 0.5  # chance is 10 %
    for name in ("plan.json", "weights.pt", "base.pt", "sensitivity.csv", "trials.csv", "study.db"):
        assert (run_dir / name).is_file(), name
    # the final fine-tune went on from the winning trial's weights; only the best few trials keep theirs
    assert summary["warm_start"] == f"checkpoints/trial-{summary['trial']}.pt"
    assert (run_dir / summary["warm_start"]).is_file() and len(list((run_dir / "checkpoints").iterdir())) <= 3


def test_plan_and_model_give_the_same_outputs(run_dir):
    model = torch.load(run_dir / "model.pt", weights_only=False)
    rebuilt = autoprune.load_pruned(run_dir)  # plan.json + weights.pt, nothing unpickled
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt(x).shape == (4, 10)


def test_running_again_adds_no_trials_and_trains_nothing(own_run, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    for module in ("study.pipeline", "study.trials", "export.final"):
        monkeypatch.setattr(f"autoprune.{module}.train", no_training)
    stamps = {f: (own_run / f).stat().st_mtime_ns for f in ("base.pt", "sensitivity.csv", "model.pt")}
    assert main([*ARGS, "--out", str(own_run)]) == 0
    study = optuna.load_study(study_name="tiny_models-digits-flops0.4", storage=f"sqlite:///{own_run / 'study.db'}")
    assert len(study.trials) == 3
    assert stamps == {f: (own_run / f).stat().st_mtime_ns for f in stamps}


def test_more_trials_resume_the_study(own_run):
    args = [a if a != "3" else "4" for a in ARGS]
    assert main([*args, "--out", str(own_run)]) == 0
    study = optuna.load_study(study_name="tiny_models-digits-flops0.4", storage=f"sqlite:///{own_run / 'study.db'}")
    ended = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]  # pruned ones count
    assert len(ended) == 4 and [t.state.name for t in study.trials[:3]] == ["COMPLETE"] * 3
    assert all(t.user_attrs["flops_share"] <= 0.4 for t in ended)


def test_changed_budget_on_the_same_study_is_refused(own_run, capsys):
    args = [*ARGS, "--out", str(own_run), "--study", "tiny_models-digits-flops0.4", "--budget", "flops=0.5"]
    assert main(args) == 2
    assert "budget was 'flops=0.4', now 'flops=0.5'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet1000"], "unknown model 'resnet1000'"),
    (["--dataset", "nope"], "unknown data set 'nope'"),
    (["--budget", "flops=lots"], "cannot read budget"),
    (["--budget", "flops=0.0001"], "smallest reachable model"),
    (["--weights", "missing.pt"], "weights file missing.pt does not exist"),
    (["--train-epochs", "0.2", "--base-lr", "1e-12", "--quiet"], "near chance"),
])
def test_bad_input_gets_one_clear_line(extra, message, tmp_path, capsys):
    args = [*ARGS[:-1], "--train-epochs", "0", "--out", str(tmp_path), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autoprune: error:") and message in err and "\n" not in err


def test_the_console_command_exits_non_zero_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "autoprune", "search", "--budget", "params=7%,flops=x"],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "CI": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "cannot read budget" in result.stderr


def test_a_failed_trial_is_not_counted_in_the_summary(own_run):
    # A trial killed by Ctrl-C is left FAIL; the rerun's summary counts only the trials that ended.
    storage = f"sqlite:///{own_run / 'study.db'}"
    study = optuna.load_study(study_name="tiny_models-digits-flops0.4", storage=storage)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    assert main([*ARGS, "--out", str(own_run)]) == 0
    summary = json.loads((own_run / "summary.json").read_text())
    assert summary["trials"] == 3 and len(study.trials) == 4


def test_a_second_study_in_a_run_folder_is_refused_and_the_first_is_kept(own_run, capsys):
    before = {f.name: f.read_bytes() for f in own_run.iterdir() if f.is_file()}
    assert main([*ARGS, "--out", str(own_run), "--budget", "flops=0.5"]) == 2
    assert "holds the results of study 'tiny_models-digits-flops0.4'" in capsys.readouterr().err
    assert before == {f.name: f.read_bytes() for f in own_run.iterdir() if f.is_file()}


def test_learning_rates_are_spelled_once():
    """The fine-tune and base learning rates live in autoprune/options.py; a copy elsewhere drifts."""
    import re
    from pathlib import Path

    import autoprune
    from autoprune.options import BASE_LR, FINETUNE_LR

    rate, number = re.compile(r"(\b|_)lr\b"), re.compile(r"(?<![\d.])0\.0[15](?!\d)")
    package = Path(autoprune.__file__).parent
    copies = [f"{path.name}:{n}" for path in package.glob("*.py") if path.name != "options.py"
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if rate.search(line.split("#")[0]) and number.search(line.split("#")[0])]
    assert not copies, f"learning rates spelled outside options.py: {copies}"
    assert (FINETUNE_LR, BASE_LR) == (0.01, 0.05)


def test_search_flags_are_the_options_with_their_defaults():
    """Every search option is a `search` flag whose default is the option's own: no default is spelled twice."""
    from autoprune.cli import build_parser
    from autoprune.options import DEFAULTS, OPTION_NAMES, SearchOptions

    args = build_parser().parse_args(["search"])
    assert [n for n in OPTION_NAMES if not hasattr(args, n)] == ["latency_timer"]  # tests inject it, users do not
    assert SearchOptions.from_args(args) == DEFAULTS
    tuned = SearchOptions.from_args(build_parser().parse_args(["search", "--trials", "3", "--lr", "0.2"]))
    assert (tuned.trials, tuned.lr) == (3, 0.2)


def test_an_unknown_search_option_is_refused_with_the_known_ones():
    from autoprune import search
    from autoprune.options import DEFAULTS

    with pytest.raises(TypeError, match="unknown search option 'trails'; known: weights, "):
        search("resnet18", "digits", "flops=0.3", trails=3)
    assert DEFAULTS.replace(trials=3).trials == 3 and DEFAULTS.trials == 12
