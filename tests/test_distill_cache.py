"""Distillation from the teacher's outputs computed once (autoprune.train.teacher): the same numbers as the
live teacher, looked up by sample index, reused only for the same base and data, and the live teacher
where the data are randomly augmented."""

import copy
import itertools
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import autoprune
from autoprune.train import distill as distill_module, loop, teacher as teacher_module
from autoprune.errors import AutopruneError
from autoprune.files import sweep
from autoprune.inputs.data import digits, from_splits
from autoprune.options import DEFAULTS
from autoprune.study.pipeline import distill_outputs, distillation, extra_settings, prepare
from autoprune.study.storage import open_study
from autoprune.train.distill import Distill, from_settings, kd_loss
from autoprune.train.loop import train
from autoprune.train.teacher import TEACHER_OUTPUTS, teacher_outputs, uncached, with_indices
from conftest import TINY
from tiny_models import tiny_resnet
from user_tasks import regression, regression_data, regressor, segmentation, segmentation_data, segmenter

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = tiny_resnet(10)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as a trained base has
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def stored(teacher, digits_data, tmp_path_factory):
    """The teacher's outputs on the digits' training set, computed once for this module (read only)."""
    return teacher_outputs(teacher, digits_data, tmp_path_factory.mktemp("cache") / TEACHER_OUTPUTS, CPU, quiet=True)


def test_the_indexed_loader_gives_the_same_batches_with_their_indices(digits_data):
    plain = list(digits_data.loader("train", 64, shuffle=True, seed=3))
    indexed = list(with_indices(digits_data.loader("train", 64, shuffle=True, seed=3)))
    assert len(plain) == len(indexed) > 10
    for (images, labels), (indices, (same_images, same_labels)) in zip(plain, indexed):
        assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
        assert torch.equal(torch.stack([digits_data.train[i][0] for i in indices.tolist()]), images)


def test_cached_outputs_are_the_live_teachers_for_the_same_samples(teacher, stored, digits_data):
    outputs = stored
    assert len(outputs) == len(digits_data.train) and outputs.outputs.dtype == torch.float16  # logits: float16
    loader = digits_data.loader("train", 64, shuffle=True, seed=5)
    assert outputs.serves(loader) and not outputs.serves(digits_data.loader("val", 64))
    for indices, (images, _) in itertools.islice(with_indices(loader), 8):  # 512 samples drawn at random
        with torch.no_grad():
            live = teacher(images)
        cached = outputs.lookup(indices, CPU)
        assert cached.dtype == torch.float32
        assert torch.equal(cached, live.half().float())  # exact, to float16's precision
        torch.testing.assert_close(cached, live, rtol=1e-3, atol=1e-3)


def test_a_tasks_outputs_are_kept_as_they_are(tmp_path):
    # A regression's outputs are stored in float32, exactly the live model's.
    data = from_splits("regression", *regression_data(), task=regression())
    torch.manual_seed(0)
    model = regressor().eval()
    outputs = teacher_outputs(model, data, tmp_path / TEACHER_OUTPUTS, CPU, quiet=True)
    assert outputs.outputs.dtype == torch.float32 and outputs.outputs.shape == (len(data.train), 1)
    for indices, (images, _) in with_indices(data.loader("train", 32, shuffle=True)):
        with torch.no_grad():
            torch.testing.assert_close(outputs.lookup(indices, CPU), model(images), rtol=1e-6, atol=1e-6)


def _losses(monkeypatch, student, teacher, data, outputs, steps=4):
    """The distillation losses of ``steps`` fine-tune steps, and how often the teacher was called."""
    seen, calls = [], []
    def recording(*args, **kwargs):
        loss = kd_loss(*args, **kwargs)
        seen.append(loss.item())
        return loss

    monkeypatch.setattr(distill_module, "kd_loss", recording)
    hook = teacher.register_forward_hook(lambda *_: calls.append(1))
    loader = data.loader("train", 64, shuffle=True, seed=7)
    torch.manual_seed(0)
    train(copy.deepcopy(student), loader, steps / len(loader), CPU, quiet=True,
          distill=Distill(teacher, 0.5, 4.0, outputs), task=data.task)
    hook.remove()
    return seen, len(calls)


def test_a_fine_tune_with_the_cache_has_the_live_teachers_loss(teacher, stored, digits_data, monkeypatch):
    torch.manual_seed(1)
    student = tiny_resnet(10)
    outputs = stored
    live, live_calls = _losses(monkeypatch, student, teacher, digits_data, None)
    cached, cached_calls = _losses(monkeypatch, student, teacher, digits_data, outputs)
    assert live_calls == 4 and cached_calls == 0  # the cache replaces the teacher's forward passes
    assert len(live) == len(cached) == 4
    assert cached[0] == pytest.approx(live[0], rel=1e-4)  # same model, same batch: the same loss
    assert cached == pytest.approx(live, rel=1e-3)  # and the same steps after it
    other = replace(digits_data, train=copy.copy(digits_data.train))  # another dataset: the teacher runs live
    _, calls = _losses(monkeypatch, student, teacher, other, outputs)
    assert calls == 4


def test_the_cache_is_reused_for_the_same_base_and_data_only(teacher, digits_data, tmp_path, monkeypatch, capsys):
    path = tmp_path / TEACHER_OUTPUTS
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    first = teacher_outputs(teacher, digits_data, path, CPU)
    assert torch.equal(torch.rand(3), expected)  # computing them draws nothing from the random streams
    assert "computed once" in capsys.readouterr().out and path.is_file()
    assert [f.name for f in tmp_path.iterdir()] == [TEACHER_OUTPUTS] and not sweep(tmp_path)  # no temporary left
    real = teacher_module._compute
    computed = []

    def counting(*args):
        computed.append(1)
        return real(*args)

    monkeypatch.setattr(teacher_module, "_compute", counting)
    again = teacher_outputs(copy.deepcopy(teacher), digits_data, path, CPU)  # a rerun: the same weights
    assert computed == [] and capsys.readouterr().out == ""
    assert again.key == first.key and torch.equal(again.outputs, first.outputs)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.fc.bias.add_(1.0)  # another base model
    changed = teacher_outputs(other, digits_data, path, CPU, quiet=True)
    assert computed == [1] and changed.key != first.key and not torch.equal(changed.outputs, first.outputs)
    resplit = digits(seed=1)  # other data: the same set split by another seed
    assert teacher_outputs(other, resplit, path, CPU, quiet=True).key != changed.key and computed == [1, 1]
    path.write_bytes(b"half a file")  # unreadable: computed afresh, never trusted
    assert teacher_outputs(teacher, digits_data, path, CPU, quiet=True).key == first.key and len(computed) == 3


class Jittered(Dataset):
    """A dataset with random augmentation: noise drawn afresh at every read, from torch's generator."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return image + 0.1 * torch.randn_like(image), label


def test_randomly_augmented_data_fall_back_to_the_live_teacher(teacher, digits_data, tmp_path, capsys):
    data = replace(digits_data, train=Jittered(digits_data.train))
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    assert teacher_outputs(teacher, data, tmp_path / TEACHER_OUTPUTS, CPU) is None
    found = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(found[0], expected[0]) and found[1:] == expected[1:]  # no random stream moved
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "teacher runs live" in lines[0] and "augmentation" in lines[0]
    assert not (tmp_path / TEACHER_OUTPUTS).exists()
    kd = from_settings(teacher, {"distill": {"weight": 0.5, "temperature": 4.0}}, None)
    assert kd.outputs is None  # the fine-tune distills from the live teacher, as before


def _seg_distill(student_output, teacher_output, batch):
    """Match the teacher's per-pixel class scores, plus the labels' cross-entropy."""
    _, masks = batch
    return F.cross_entropy(student_output["out"], masks) + F.mse_loss(student_output["out"], teacher_output["out"])


def test_a_tasks_own_distillation_loss_is_used_with_cached_outputs(tmp_path):
    seen = []

    def recording(student_output, teacher_output, batch):
        seen.append((student_output, teacher_output, batch))
        return _seg_distill(student_output, teacher_output, batch)

    task = replace(segmentation(), distill_loss=recording)
    data = from_splits("segmentation", *segmentation_data(), task=task)
    torch.manual_seed(0)
    teacher = segmenter().eval()
    outputs = teacher_outputs(teacher, data, tmp_path / TEACHER_OUTPUTS, CPU, quiet=True)
    assert set(outputs.outputs) == {"out"} and outputs.outputs["out"].dtype == torch.float32
    loader = data.loader("train", 32, shuffle=True)
    train(segmenter(), loader, 2 / len(loader), CPU, quiet=True, distill=Distill(teacher, outputs=outputs), task=task)
    assert len(seen) == 2
    for student_output, teacher_output, (images, _) in seen:
        assert student_output["out"].requires_grad and not teacher_output["out"].requires_grad
        with torch.no_grad():
            torch.testing.assert_close(teacher_output["out"], teacher(images)["out"], rtol=1e-5, atol=1e-5)


def test_a_tasks_distillation_loss_must_be_a_scalar(tmp_path):
    task = replace(regression(), distill_loss=lambda student, teacher, batch: (student - teacher).abs())
    data = from_splits("regression", *regression_data(), task=task)
    with pytest.raises(AutopruneError, match="distill_loss.*returned a tensor of shape"):
        train(regressor(), data.loader("train", 32, shuffle=True), 0.1, CPU, quiet=True,
              distill=Distill(regressor().eval()), task=task)


def test_distill_is_refused_for_a_task_without_its_own_loss_and_taken_with_one(tmp_path):
    options = DEFAULTS.replace(distill=True, train_epochs=0.0, quiet=True, device="cpu")
    splits = segmentation_data()
    with pytest.raises(AutopruneError, match="--distill softens a classifier's logits.*distill_loss"):
        prepare(segmenter(), splits, "flops=0.5", options.replace(out=tmp_path / "a", task=segmentation()))
    task = replace(segmentation(), distill_loss=_seg_distill)
    prepared = prepare(segmenter(), splits, "flops=0.5", options.replace(out=tmp_path / "b", task=task))
    outputs = distill_outputs(prepared, options)
    assert outputs is not None and (tmp_path / "b" / TEACHER_OUTPUTS).is_file()
    assert distill_outputs(prepared, options.replace(distill=False)) is None
    # Left out, a task of the user's own does not distill: it opts in with --distill.
    assert distillation(prepared, options.replace(distill=None)).distill is False


def test_by_default_a_classifier_distills_a_resumed_study_as_it_was_made_and_the_flags_decide(digits_data,
                                                                                              tmp_path):
    options = DEFAULTS.replace(train_epochs=0.0, quiet=True, device="cpu", out=tmp_path / "run")
    assert options.distill is None
    run = prepare(tiny_resnet(10), digits_data, "flops=0.5", options)
    assert distillation(run, options).distill is True
    assert not (tmp_path / "run").exists()  # decided before anything is written
    assert extra_settings(options.replace(distill=True))["distill"] == {"weight": 0.5, "temperature": 4.0}
    assert distillation(run, options.replace(distill=False)).distill is False
    # A study made without distillation (before it was the default) resumes without it, unless asked.
    open_study(run.study, run.storage, {"seed": 0})
    assert distillation(run, options).distill is False
    assert distillation(run, options.replace(distill=True)).distill is True
    assert distillation(run, options.replace(new_study=True)).distill is True  # a fresh study: the default
    open_study(run.study, run.storage, extra_settings(options.replace(distill=True)), new=True)  # made with it
    assert distillation(run, options).distill is True
    # A classifier's logits too large to keep: the teacher would run live, so the default does not distill.
    assert "GiB" in uncached(replace(digits_data, num_classes=10**6)) and uncached(digits_data) is None


def test_by_default_augmented_data_are_not_distilled_and_with_distill_the_teacher_runs_live(teacher, digits_data,
                                                                                          tmp_path, capsys):
    data = replace(digits_data, train=Jittered(digits_data.train))
    options = DEFAULTS.replace(train_epochs=0.0, device="cpu", out=tmp_path / "run")
    run = prepare(teacher, data, "flops=0.5", options)
    capsys.readouterr()
    assert distillation(run, options).distill is False
    line = capsys.readouterr().out.strip()
    assert line.startswith("distillation: off (--distill runs the teacher live in every step)")
    assert "augmentation" in line
    assert distillation(run, options.replace(distill=True)).distill is True
    assert distill_outputs(run, options.replace(distill=True)) is None  # the live teacher, as asked
    assert "teacher runs live in every step" in capsys.readouterr().out


@pytest.mark.slow  # two small searches end to end (~10 s on an idle machine)
def test_a_search_computes_the_outputs_once_and_a_resumed_run_reuses_them(digits_data, tmp_path, monkeypatch):
    from autoprune.export import final
    from autoprune.study import trials

    seen = []
    real_train = loop.train

    def recording(*args, distill=None, **kwargs):
        seen.append(distill)
        return real_train(*args, distill=distill, **kwargs)

    for module in (trials, final):
        monkeypatch.setattr(module, "train", recording)
    out = tmp_path / "run"
    settings = dict(trials=2, train_epochs=0.5, finetune_epochs=0.05, final_epochs=0.05, grid=(0.5,), distill=True,
                    out=out, quiet=True)
    autoprune.search(f"{TINY}:mlp", digits_data, "flops=0.5", **settings)
    assert (out / TEACHER_OUTPUTS).is_file() and len(seen) == 3  # two trials and the final fine-tune
    assert all(kd is not None and kd.outputs is not None for kd in seen)
    assert len({id(kd.outputs) for kd in seen}) == 1  # one cache for the whole run
    monkeypatch.setattr(teacher_module, "_compute", lambda *args: pytest.fail("computed again"))
    seen.clear()
    autoprune.search(f"{TINY}:mlp", digits_data, "flops=0.5", **{**settings, "trials": 3})
    assert seen and all(kd.outputs is not None for kd in seen)
