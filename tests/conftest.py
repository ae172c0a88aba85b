import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Commands a test starts get one torch thread (OMP_NUM_THREADS): on a 2-core machine shared with other
# work, two threads per process spin against each other (a training step 5-8x slower). The tests' own
# process keeps two: the shared searches' results (the range study's front) were tuned with two.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(2)

from tiny_models import tiny_resnet  # noqa: E402

from autoprune.inputs.data import digits  # noqa: E402

TINY = str(Path(__file__).parent / "tiny_models.py")
# A small real search (~10 s): digits, a residual model, three trials. Shared by the CLI tests and
# the pareto/report/export tests, so the suite runs it once.
SEARCH_ARGS = ["search", "--model", f"{TINY}:tiny_resnet", "--dataset", "digits", "--budget", "flops=0.4",
               "--trials", "3", "--train-epochs", "6", "--finetune-epochs", "0.5", "--final-epochs", "2",
               "--grid", "0.25,0.5,0.75", "--quiet"]
TINY_STUDY = "tiny_models-digits-flops0.4"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The run directory of the small search (study.db, base.pt, sensitivity.csv, model.pt, ...).

    Read only, so that no test depends on which tests ran before it: a test that
    runs the search again or writes into it works on a copy (test_cli's ``own_run``).
    """
    yield from _read_only_run(tmp_path_factory, "run", SEARCH_ARGS, "tiny_run")


# A range study (~25 s): six targets from 15 % to 60 % of the FLOPs; its twelve trials are the sensitivity
# seed and the uniform plan at every target. Shared by test_range and test_browser, read only.
RANGE_ARGS = ["search", "--model", f"{TINY}:tiny_resnet", "--dataset", "digits", "--budget", "flops=0.15..0.6",
              "--trials", "12", "--train-epochs", "4", "--finetune-epochs", "0.3", "--final-epochs", "0.3",
              "--grid", "0.5,0.75", "--quiet"]
RANGE_STUDY = "tiny_models-digits-flops0.15..0.6"


@pytest.fixture(scope="session")
def tiny_range_run(tmp_path_factory):
    """The run directory of the small range study; a test that writes to it works on a copy."""
    yield from _read_only_run(tmp_path_factory, "range", RANGE_ARGS, "tiny_range_run")


def _read_only_run(tmp_path_factory, prefix: str, args: list[str], name: str):
    """Run the search ``args`` once into a fresh folder, hand it out, and check nobody wrote into it."""
    from autoprune.cli import main

    out = tmp_path_factory.mktemp(prefix)
    assert main([*args, "--out", str(out)]) == 0
    before = _contents(out)
    yield out
    assert _contents(out) == before, f"a test changed the shared {name}; give it a copy instead"


def _contents(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha1(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="session")
def digits_data():
    return digits(seed=0)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return tiny_resnet(10).eval()


@pytest.fixture
def example():
    return torch.zeros(1, 3, 32, 32)
