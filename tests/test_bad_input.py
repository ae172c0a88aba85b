"""Bad input through the real command: one line on stderr, exit 2, no traceback, nothing written.

Every case runs ``python -m autoprune`` in a process of its own. The cases are started
together (a few at a time) by one module fixture; each test then checks its own case.
Cases that need a finished study get their own copy of the shared tiny search.

Most of a fresh command's time is importing torch (about 4 s of CPU), so the default run
starts the cases from ``command_server.py``, which imports autoprune once and forks a
child per case that runs ``autoprune/__main__.py`` as ``-m`` does ("preloaded"); the slow
tier runs every case again in a fresh interpreter, as a user types it ("fresh").
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SEARCH_ARGS, TINY, TINY_STUDY, _contents

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{TINY}:tiny_resnet"
# A fresh search that fails before training: no base training, one short trial if it got that far.
FRESH = ["search", "--model", MODEL, "--train-epochs", "0", "--trials", "1", "--finetune-epochs", "0.05",
         "--final-epochs", "0", "--quiet"]
WEIGHT = [*FRESH, "--granularity", "weight", "--budget", "params=0.5"]
TASKS = str(Path(__file__).with_name("user_tasks.py"))  # a user's own tasks, and tasks wrong in one way each
REGRESSION = ["--model", f"{TASKS}:regressor", "--dataset", f"{TASKS}:regression_data"]


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # OUT: the run folder; FILE: a plain file; RAISES/SYNTAX: bad .py files
    message: str  # a piece of the one line
    finished: bool = False  # run it on a copy of a finished study's run folder
    offline: bool = False  # no network: downloads go to a proxy that is not there


OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
ONEHOT = """import torch
from torch.utils.data import TensorDataset


def f():
    data = TensorDataset(torch.randn(12, 1, 8, 8), torch.nn.functional.one_hot(torch.arange(12) % 3, 3))
    return data, data, data
"""


CASES = [
    Case("out under a file", (*FRESH, "--out", "FILE/run"), "FILE is a file"),
    Case("out read-only", (*FRESH, "--out", "READONLY/run"), "cannot be written"),
    Case("sqlite url without ://", (*FRESH, "--out", "OUT", "--storage", "sqlite//x.db"), "cannot read storage URL"),
    Case("sqlite url with one slash", (*FRESH, "--out", "OUT", "--storage", "sqlite:/x.db"), "cannot read storage URL"),
    Case("sqlite in memory", (*FRESH, "--out", "OUT", "--storage", "sqlite://"), "names no file"),
    Case("sqlite under a file", (*FRESH, "--out", "OUT", "--storage", "sqlite:///FILE/x.db"), "FILE is a file"),
    Case("postgresql not there", (*FRESH, "--out", "OUT", "--storage", "postgresql+psycopg2://u:p@127.0.0.1:1/x"),
         "Connection refused"),
    Case("postgresql default driver", (*FRESH, "--out", "OUT", "--storage", "postgresql://u:p@127.0.0.1:1/x"),
         "write postgresql+psycopg2://"),
    Case("unknown storage", (*FRESH, "--out", "OUT", "--storage", "redis://x"), "unknown storage"),
    Case("journal under a file", (*FRESH, "--out", "OUT", "--storage", "FILE/study.log"), "FILE is a file"),
    Case("model file raises", (*FRESH, "--out", "OUT", "--model", "RAISES:f"), "RuntimeError: boom"),
    Case("model factory raises when called", (*FRESH, "--out", "OUT", "--model", "FAILS:f"), "RuntimeError: boom"),
    Case("data factory raises when called", (*FRESH, "--out", "OUT", "--dataset", "FAILS:f"), "RuntimeError: boom"),
    Case("model class made inside its factory", (*FRESH, "--out", "OUT", "--model", f"{TINY}:local_class"),
         "cannot be saved as model.pt"),
    Case("model file syntax error", (*FRESH, "--out", "OUT", "--model", "SYNTAX:f"), "SyntaxError"),
    Case("data file raises", (*FRESH, "--out", "OUT", "--dataset", "RAISES:f"), "RuntimeError: boom"),
    Case("data labels one-hot", (*FRESH, "--out", "OUT", "--model", "mlp", "--dataset", "ONEHOT:f"),
         "gives labels of shape (3,)"),
    Case("pretrained weights offline", (*FRESH, "--out", "OUT", "--model", "resnet18", "--weights", "DEFAULT"),
         "could not download resnet18's DEFAULT weights", offline=True),
    Case("download offline", (*FRESH, "--out", "OUT", "--dataset", "cifar10", "--download", "--data-dir", "DATA"),
         "could not download cifar10", offline=True),
    Case("data file syntax error", (*FRESH, "--out", "OUT", "--dataset", "SYNTAX:f"), "SyntaxError"),
    Case("batch size 0", (*FRESH, "--out", "OUT", "--batch-size", "0"), "--batch-size must be at least 1"),
    Case("negative lr", (*FRESH, "--out", "OUT", "--lr", "-1"), "--lr must be a positive number"),
    Case("nan lr", (*FRESH, "--out", "OUT", "--lr", "nan"), "--lr must be a positive number"),
    Case("zero base lr", (*FRESH, "--out", "OUT", "--base-lr", "0"), "--base-lr must be a positive number"),
    Case("grid above 1", (*FRESH, "--out", "OUT", "--grid", "0.5,1.5"), "--grid takes ratios"),
    Case("max ratio above 1", (*FRESH, "--out", "OUT", "--max-ratio", "1.5"), "--max-ratio takes ratios"),
    Case("round to 0", (*FRESH, "--out", "OUT", "--round-to", "0"), "--round-to must be at least 1"),
    Case("no trials", (*FRESH, "--out", "OUT", "--trials", "0"), "--trials must be at least 1"),
    Case("no workers", (*FRESH, "--out", "OUT", "--workers", "0"), "--workers must be at least 1"),
    Case("trials not a number", (*FRESH, "--out", "OUT", "--trials", "many"), "invalid int value"),
    Case("budget above the base", (*FRESH, "--out", "OUT", "--budget", "flops=999G"), "does not prune"),
    Case("budget above 100 %", (*FRESH, "--out", "OUT", "--budget", "flops=150%"), "at most all"),
    Case("latency unreadable", (*FRESH, "--out", "OUT", "--budget", "latency=3parsecs"), "cannot read budget term"),
    Case("latency backend unknown", (*FRESH, "--out", "OUT", "--latency-backend", "foo"), "invalid choice: 'foo'"),
    Case("latency batch 0", (*FRESH, "--out", "OUT", "--latency-batch", "0"), "--latency-batch must be"),
    Case("budget unreadable", (*FRESH, "--out", "OUT", "--budget", "flops=lots"), "cannot read budget"),
    Case("budget range backwards", (*FRESH, "--out", "OUT", "--budget", "flops=0.5..0.1"),
         "must go from the smaller to the larger end"),
    Case("budget range share to count", (*FRESH, "--out", "OUT", "--budget", "flops=0.1..20M"),
         "mixes a share and a count"),
    Case("budget range with a time budget", (*FRESH, "--out", "OUT", "--budget", "flops=0.1..0.5",
                                             "--time-budget", "60"), "leave out --time-budget"),
    Case("race without a time budget", (*FRESH, "--out", "OUT", "--no-race"), "give --time-budget too"),
    Case("weight with workers", (*WEIGHT, "--out", "OUT", "--workers", "2"), "--workers runs channel searches"),
    Case("weight with pruner", (*WEIGHT, "--out", "OUT", "--pruner", "none"), "--pruner stops channel-search"),
    Case("weight budget above the base", (*FRESH, "--out", "OUT", "--granularity", "weight", "--budget",
                                          "params=999G"), "does not prune"),
    Case("unknown model", (*FRESH, "--out", "OUT", "--model", "resnet1000"), "unknown model"),
    Case("unknown data set", (*FRESH, "--out", "OUT", "--dataset", "nope"), "unknown data set"),
    Case("missing weights", (*FRESH, "--out", "OUT", "--weights", "missing.pt"), "does not exist"),
    Case("export storage not there", ("export", "--study", "x", "--storage", "sqlite:///OUT/none.db"),
         "does not exist"),
    Case("export under every trial", ("export", "--study", TINY_STUDY, "--run-dir", "OUT", "--flops", "0.01"),
         "has no finished trial at or under flops=0.01", finished=True),
    Case("export a trial and a point", ("export", "--study", TINY_STUDY, "--run-dir", "OUT", "--flops", "0.4",
                                        "--trial", "0"), "not both", finished=True),
    Case("second study in a run folder", (*SEARCH_ARGS, "--out", "OUT", "--budget", "flops=0.5"),
         "holds the results of study", finished=True),
    Case("bad batch size on a finished study", (*SEARCH_ARGS, "--out", "OUT", "--batch-size", "0"),
         "--batch-size must be at least 1", finished=True),
    Case("bad lr on a finished study", (*SEARCH_ARGS, "--out", "OUT", "--lr", "-1"),
         "--lr must be a positive number", finished=True),
    Case("task file lacks the name", (*FRESH, "--out", "OUT", "--task", f"{TASKS}:nope"), "has no 'nope'"),
    Case("task factory returns no task", (*FRESH, "--out", "OUT", "--task", f"{TASKS}:not_a_task"),
         "returned dict, not an autoprune.Task"),
    Case("task score not a finite number", (*FRESH, *REGRESSION, "--out", "OUT", "--task", f"{TASKS}:nan_score"),
         "score(model, loader) returned nan"),
    Case("task loss not a scalar", (*FRESH, *REGRESSION, "--out", "OUT", "--task", f"{TASKS}:vector_loss"),
         "loss(model, batch) returned a tensor of shape (8, 1)"),
    Case("task inputs the model cannot take", (*FRESH, *REGRESSION, "--out", "OUT", "--task", f"{TASKS}:wrong_inputs"),
         "the model called with inputs(batch) failed"),
    Case("task that does not fit a shipped data set", (*FRESH, "--out", "OUT", "--dataset", "digits", "--task",
                                                       f"{TASKS}:segmentation"), "fit each other"),
    Case("distillation with a task", (*FRESH, *REGRESSION, "--out", "OUT", "--task", f"{TASKS}:regression",
                                      "--distill"), "--distill softens a classifier's logits"),
    Case("model file raises on a finished study", (*SEARCH_ARGS, "--out", "OUT", "--study", TINY_STUDY,
                                                   "--model", "RAISES:f"), "RuntimeError: boom", finished=True),
]


def _prepare(case: Case, folder: Path, finished_run: Path) -> list[str]:
    """The case's folder (OUT a copy of the finished run, or not yet there) and its arguments."""
    folder.mkdir()
    (folder / "FILE").write_text("not a folder\n")
    (folder / "RAISES.py").write_text("raise RuntimeError('boom')\n")
    (folder / "SYNTAX.py").write_text("def f(:\n")
    (folder / "FAILS.py").write_text("def f(num_classes=10):\n    raise RuntimeError('boom')\n")
    (folder / "ONEHOT.py").write_text(ONEHOT)
    (folder / "READONLY").mkdir(mode=0o555)
    if case.finished:
        shutil.copytree(finished_run, folder / "OUT")
    names = {"OUT": "OUT", "FILE": "FILE", "READONLY": "READONLY", "RAISES": "RAISES.py", "SYNTAX": "SYNTAX.py",
             "FAILS": "FAILS.py", "ONEHOT": "ONEHOT.py", "DATA": "DATA"}
    args = []
    for arg in case.args:
        for key, value in names.items():
            if arg == key or arg.startswith(key + ":") or arg.startswith(key + "/") or f"///{key}/" in arg:
                arg = arg.replace(key, str(folder / value), 1)
                break
        args.append(arg)
    return args


PARALLEL = min(4, os.cpu_count() or 1)
SERVER = Path(__file__).with_name("command_server.py")


def _env(cwd: Path, offline: bool = False) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CI": "1", **(OFFLINE | {"TORCH_HOME": str(cwd / "torch")} if offline else {})}
    env.pop("AUTOPRUNE_DEBUG", None)
    return env


def _fresh(jobs: dict[str, tuple[list[str], Path, bool]], logs: Path) -> dict[str, subprocess.CompletedProcess]:
    """Each job as ``python -m autoprune ARGS`` in a fresh interpreter, a few at a time."""
    def one(name: str) -> subprocess.CompletedProcess:
        args, cwd, offline = jobs[name]
        return subprocess.run([sys.executable, "-m", "autoprune", *args], capture_output=True, text=True,
                              cwd=cwd, env=_env(cwd, offline), timeout=600)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return dict(zip(jobs, pool.map(one, jobs)))


def _preloaded(jobs: dict[str, tuple[list[str], Path, bool]], logs: Path) -> dict[str, subprocess.CompletedProcess]:
    """Each job in a process forked from one that imported autoprune already (command_server.py)."""
    requests = {}
    for i, (name, (args, cwd, offline)) in enumerate(jobs.items()):
        requests[name] = {"id": name, "args": args, "cwd": str(cwd), "env": _env(cwd, offline),
                          "stdout": str(logs / f"{i}.out"), "stderr": str(logs / f"{i}.err")}
    server = subprocess.run([sys.executable, str(SERVER)], input="".join(json.dumps(r) + "\n" for r in requests.values()),
                            capture_output=True, text=True, cwd=logs, timeout=1200,
                            env={**_env(logs), "AUTOPRUNE_TEST_PARALLEL": str(PARALLEL)})
    assert server.returncode == 0, server.stderr[-3000:]
    codes = {done["id"]: done["returncode"] for done in map(json.loads, server.stdout.splitlines())}
    assert codes.keys() == requests.keys(), server.stderr[-3000:]
    return {name: subprocess.CompletedProcess(r["args"], codes[name], Path(r["stdout"]).read_text(),
                                              Path(r["stderr"]).read_text()) for name, r in requests.items()}


RUNNERS = {"preloaded": _preloaded, "fresh": _fresh}


@pytest.fixture(scope="module", params=["preloaded", pytest.param("fresh", marks=pytest.mark.slow)])
def results(request, tiny_run, tmp_path_factory):
    """Every case run once, a few at a time: (result, the run folder's files before, after)."""
    root = tmp_path_factory.mktemp(f"bad-{request.param}")
    logs = root / "logs"
    logs.mkdir()
    prepared = {}
    for i, case in enumerate(CASES):
        folder = root / f"case{i}"
        args = _prepare(case, folder, tiny_run)
        prepared[case.name] = (folder, args, _contents(folder / "OUT") if case.finished else None)
    # root would write into the read-only folder: the search would run (its test skips)
    jobs = {name: (args, folder, case_of(name).offline) for name, (folder, args, _) in prepared.items()
            if not (name == "out read-only" and os.geteuid() == 0)}
    ran = RUNNERS[request.param](jobs, logs)

    def outcome(name: str):
        if name not in ran:
            return None
        folder, _, before = prepared[name]
        out = folder / "OUT"
        return ran[name], before, (_contents(out) if case_of(name).finished else out.exists())

    return {name: outcome(name) for name in prepared}


def case_of(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def test_there_are_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(case, results):
    if case.name == "out read-only" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    result, before, after = results[case.name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert case.message in lines[0]
    if case.finished:
        assert after == before, "the finished run folder changed"
    else:
        assert after is False, "a run folder was made for input that was refused"
