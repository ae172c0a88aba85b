from pathlib import Path

import pytest
import torch

from autoprune.errors import AutopruneError
from autoprune.models import absolute_spec, build_model, load_weights, read_state_dict
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
