"""Kill the search with SIGKILL at several points, rerun it, and check nothing was lost or doubled.

Also several workers on one study: local processes (--workers) and, with a
PostgreSQL server (AUTOPRUNE_TEST_POSTGRES), two processes as two machines would run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from autoprune.study.storage import storage_for
from conftest import TINY

N = 5
ARGS = ["search", "--model", f"{TINY}:tiny_resnet", "--dataset", "digits", "--budget", "flops=0.4",
        "--trials", str(N), "--train-epochs", "3", "--finetune-epochs", "1", "--final-epochs", "0.5",
        "--grid", "0.25,0.5,0.75", "--quiet", "--study", "kill"]
ROOT = Path(__file__).parents[1]
WAIT_S = 600  # only against a hang: every wait below is on a state, never on how fast the machine is
pytestmark = pytest.mark.process  # kills, several processes: .ci/run runs these twice more


def _start(out: Path, *extra: str, env: dict[str, str] | None = None, args: list[str] = ARGS) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "autoprune", *args, "--out", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Output:
    """Everything a started process has printed so far, read on a thread so that the pipe never fills."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for chunk in iter(lambda: process.stdout.read(1), ""):
            self.text += chunk


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="kill", storage=storage_for(storage)).trials
    except KeyError:  # not created yet
        return []


def _kill_when(process: subprocess.Popen, ready, timeout: float = WAIT_S) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (it must not have finished first)."""
    end = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point:\n{process.stdout.read()}"
        assert time.monotonic() < end, "the kill point never came (a hang?)"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


ENDED = ("COMPLETE", "PRUNED")  # pruned trials count towards --trials, as in Optuna


def _check_finished_run(out: Path, storage: str, n: int = N) -> list:
    trials = _trials(storage)
    ended = [t for t in trials if t.state.name in ENDED]
    complete = [t for t in ended if t.state.name == "COMPLETE"]
    assert len(ended) == n, [(t.number, t.state.name, t.user_attrs.get("skipped")) for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    table = pd.read_csv(out / "sensitivity.csv")
    assert not table.duplicated(["group", "ratio"]).any()
    assert len(table) == table["group"].nunique() * 3  # every group at every grid ratio
    assert not list(out.glob(".*.tmp")), "a killed write left its temporary file"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flops"] <= 0.4 * summary["base_flops"] and summary["trial"] in [t.number for t in complete]
    return trials


@pytest.mark.slow
def test_killed_three_times_then_resumed_ends_with_exactly_the_requested_trials(tmp_path):
    out = tmp_path / "run"
    db = f"sqlite:///{out / 'study.db'}"
    # 1: while the base model trains. Asked for epochs it cannot finish before the kill, whatever the
    # machine's speed; --train-epochs is no part of the study, so the next run trains the usual 3.
    # Not --quiet: the kill waits for the training's progress bar.
    process = _start(out, "--train-epochs", "10000", args=[a for a in ARGS if a != "--quiet"])
    printed = Output(process)
    _kill_when(process, lambda: "train base" in printed.text and "loss=" in printed.text)  # a step is done
    assert not (out / "base.pt").exists()
    # 2: in the middle of the sensitivity scan
    process = _start(out)
    _kill_when(process, lambda: (out / "sensitivity.csv").is_file())
    scanned = len(pd.read_csv(out / "sensitivity.csv"))
    assert not [t for t in _trials(db) if t.state.name == "RUNNING"], "the kill came after the scan"
    # 3: while a trial runs, after one has finished
    process = _start(out)
    _kill_when(process, lambda: sum(t.state.name == "COMPLETE" for t in _trials(db)) >= 1
               and any(t.state.name == "RUNNING" for t in _trials(db)))
    killed = [t.number for t in _trials(db) if t.state.name == "RUNNING"]
    assert len(pd.read_csv(out / "sensitivity.csv")) >= scanned  # no finished cell lost
    assert (out / "base.pt").is_file()
    process = _start(out)  # the same command resumes and finishes
    assert process.wait(timeout=WAIT_S) == 0, process.stdout.read()
    trials = _check_finished_run(out, db)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == killed and failed[0].user_attrs["failed"] == "its worker died"
    retried = [t for t in trials if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retried) == 1 and retried[0].state.name in ENDED
    assert retried[0].params == failed[0].params  # the killed trial was tried again, not forgotten


# Test-only hook (autoprune.study.workers.hold_for_test): every worker's first trial waits until two
# processes have started one, so both take part however long the spawned one needs to start.
BOTH_WORK = {"AUTOPRUNE_TEST_HOLD_UNTIL_WORKERS": "2"}


@pytest.mark.slow
def test_two_local_workers_share_one_study(tmp_path):
    out = tmp_path / "run"
    process = _start(out, "--workers", "2", "--trials", "10", env=BOTH_WORK)
    assert process.wait(timeout=WAIT_S) == 0, process.stdout.read()
    trials = _check_finished_run(out, str(out / "study.log"), 10)
    ran = [t for t in trials if t.state.name in ENDED]
    assert len({t.system_attrs["autoprune:worker"]["pid"] for t in ran}) == 2  # both did work
    assert len({tuple(sorted(t.params.items())) for t in ran}) == 10  # no candidate trained twice


def _postgres() -> str:
    url = os.environ.get("AUTOPRUNE_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: set AUTOPRUNE_TEST_POSTGRES=postgresql+psycopg2://… (.ci/run does)")
    return url


@pytest.mark.slow
def test_two_processes_share_a_study_on_postgresql(tmp_path):
    url = _postgres()
    try:
        optuna.delete_study(study_name="kill", storage=storage_for(url))
    except KeyError:
        pass
    torch.manual_seed(0)
    sys.path.insert(0, str(Path(TINY).parent))
    from tiny_models import tiny_resnet
    weights = tmp_path / "base.pt"  # machines share trained weights (the recipe in the README)
    torch.save(tiny_resnet(10).state_dict(), weights)
    outs = [tmp_path / "a", tmp_path / "b"]
    processes = [_start(out, "--storage", url, "--weights", str(weights), "--train-epochs", "0", env=BOTH_WORK)
                 for out in outs]
    for process in processes:
        assert process.wait(timeout=WAIT_S) == 0, process.stdout.read()
    trials = _check_finished_run(outs[0], url)
    ran = [t for t in trials if t.state.name in ENDED]
    assert len({t.number for t in ran}) == N
    assert len({t.system_attrs["autoprune:worker"]["pid"] for t in ran}) == 2
    # one scan, shared: both machines hold the same measurements (same timings, not a second scan)
    tables = [pd.read_csv(out / "sensitivity.csv").sort_values(["group", "ratio"]).reset_index(drop=True)
              for out in outs]
    pd.testing.assert_frame_equal(tables[0], tables[1])


@pytest.mark.slow
def test_killed_three_times_at_random_moments_then_resumed(tmp_path):
    """The issue's acceptance check: random kill times, whatever phase they land in."""
    seed = int(os.environ.get("AUTOPRUNE_KILL_SEED") or time.time_ns() % 10_000)
    moments = random.Random(seed).sample([x / 2 for x in range(4, 30)], 3)  # 2 s … 14.5 s after start
    print(f"kill moments {moments} s; AUTOPRUNE_KILL_SEED={seed} replays them")  # shown when the test fails
    out = tmp_path / "run"
    for moment in moments:
        process = _start(out)
        try:
            process.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
    process = _start(out)
    assert process.wait(timeout=WAIT_S) == 0, f"kill seed {seed}, moments {moments}:\n{process.stdout.read()}"
    _check_finished_run(out, f"sqlite:///{out / 'study.db'}")
