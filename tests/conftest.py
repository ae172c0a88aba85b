import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from tiny_models import tiny_resnet  # noqa: E402

from autoprune.data import digits  # noqa: E402

TINY = str(Path(__file__).parent / "tiny_models.py")


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
