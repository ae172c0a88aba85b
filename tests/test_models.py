from pathlib import Path

import subprocess
import sys

import pytest
import torch

from autoprune.errors import AutopruneError
from autoprune.files import save_torch
from autoprune.inputs.models import absolute_spec, build_model, check_picklable, load_weights, read_state_dict
from conftest import TINY


def test_torchvision_model_gets_the_data_sets_classes():
    assert build_model("resnet18", num_classes=7).fc.out_features == 7


def test_factory_from_a_file_and_from_a_module():
    assert build_model(f"{TINY}:tiny_resnet", num_classes=3).fc.out_features == 3
    assert isinstance(build_model("torchvision.models:resnet18", num_classes=5), torch.nn.Module)


def test_a_file_spec_made_absolute_builds_from_any_folder(tmp_path, monkeypatch):
    """What a study and a plan record, so export and load_pruned rebuild a relative file's model anywhere."""
    monkeypatch.chdir(Path(TINY).parent)
    spec = absolute_spec("tiny_models.py:tiny_resnet")
    monkeypatch.chdir(tmp_path)
    assert build_model(spec, num_classes=3).fc.out_features == 3
    assert absolute_spec("resnet18") == "resnet18"
    assert absolute_spec("torchvision.models:resnet18") == "torchvision.models:resnet18"


@pytest.mark.parametrize("spec, message", [
    ("resnet1000", "unknown model 'resnet1000'"),
    (f"{TINY}:missing", "no callable 'missing'"),
    (f"{TINY}:not_a_model", "not an nn.Module"),
    (f"{TINY}:fails", r"model factory .*tiny_models.py:fails raised RuntimeError: this factory fails on purpose"),
    ("no/such/file.py:make", "does not exist"),
    ("nosuchpackage.models:make", "cannot import"),
])
def test_bad_model_specs_are_refused_clearly(spec, message):
    with pytest.raises(AutopruneError, match=message):
        build_model(spec, num_classes=10)


def test_weights_load_from_a_state_dict_or_a_checkpoint(tiny, tmp_path):
    torch.save({"state_dict": tiny.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    fresh = build_model(f"{TINY}:tiny_resnet", 10)
    load_weights(fresh, tmp_path / "ckpt.pt")
    torch.testing.assert_close(fresh.fc.weight, tiny.fc.weight)
    torch.save({f"module.{k}": v for k, v in tiny.state_dict().items()}, tmp_path / "dp.pt")
    assert set(read_state_dict(tmp_path / "dp.pt")) == set(tiny.state_dict())


def test_weights_that_do_not_fit_are_refused(tiny, tmp_path):
    torch.save(build_model(f"{TINY}:tiny_resnet", 4).state_dict(), tmp_path / "four.pt")
    with pytest.raises(AutopruneError, match="do not fit the model .*wrong shape: fc.weight"):
        load_weights(tiny, tmp_path / "four.pt")
    with pytest.raises(AutopruneError, match="does not exist"):
        load_weights(tiny, tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(AutopruneError, match="cannot read weights"):
        load_weights(tiny, tmp_path / "junk.pt")


MYNET = """import torch.nn as nn


class Stem(nn.Module):  # the user's own class: pickled by reference, it needs this file's module
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def net(num_classes=10):
    return nn.Sequential(Stem(), nn.Linear(4, num_classes))
"""


def test_a_saved_model_with_a_class_of_the_users_file_loads_in_a_fresh_process(tmp_path):
    (tmp_path / "mynet.py").write_text(MYNET)
    save_torch(build_model(f"{tmp_path / 'mynet.py'}:net", num_classes=3), tmp_path / "model.pt")
    (tmp_path / "mynet.py").unlink()  # nor can the file be imported: the class comes with the model
    (tmp_path / "elsewhere").mkdir()
    load = f"import torch; print(torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)(torch.zeros(2, 3, 8, 8)).shape)"
    found = subprocess.run([sys.executable, "-c", load], cwd=tmp_path / "elsewhere", capture_output=True, text=True)
    assert found.returncode == 0 and "torch.Size([2, 3])" in found.stdout, found.stderr


def test_a_saved_model_loads_beside_another_file_of_the_same_name(tmp_path):
    """A process that imported another mynet.py keeps it, and the model gets its own classes."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "mynet.py").write_text(MYNET)
    (tmp_path / "b" / "mynet.py").write_text(MYNET.replace("nn.Conv2d(3, 4, 3)", "nn.Conv2d(3, 4, 1)"))
    save_torch(build_model(f"{tmp_path / 'a' / 'mynet.py'}:net", num_classes=3), tmp_path / "model.pt")
    other = build_model(f"{tmp_path / 'b' / 'mynet.py'}:net", num_classes=3)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded[0].conv.kernel_size == (3, 3) and type(loaded[0]) is not type(other[0])
    assert sys.modules["_autoprune_user_mynet"].Stem is type(other[0])
    assert loaded(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


def test_a_model_whose_class_is_made_inside_its_factory_is_refused_before_training():
    """No pickle can name such a class: model.pt would fail after the whole search."""
    check_picklable(build_model(f"{TINY}:tiny_resnet", num_classes=3), "tiny_resnet")
    with pytest.raises(AutopruneError, match="cannot be saved as model.pt .*local_class.<locals>.Local"):
        check_picklable(build_model(f"{TINY}:local_class", num_classes=3), "local_class")
