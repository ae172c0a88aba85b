"""Knowledge distillation: the loss, and that the teacher really shapes what the student learns."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from autoprune.inputs.task import CLASSIFICATION
from autoprune.train.distill import Distill, from_settings, kd_loss
from autoprune.errors import AutopruneError
from autoprune.train.loop import train


def test_kd_loss_blends_cross_entropy_and_softened_kl():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(student, labels)
    kl = F.kl_div(F.log_softmax(student / 3, 1), F.softmax(teacher / 3, 1), reduction="batchmean") * 9
    torch.testing.assert_close(kd_loss(student, teacher, labels, 0.0, 3.0), ce)
    torch.testing.assert_close(kd_loss(student, teacher, labels, 1.0, 3.0), kl)
    torch.testing.assert_close(kd_loss(student, teacher, labels, 0.25, 3.0), 0.75 * ce + 0.25 * kl)
    assert kd_loss(teacher, teacher, labels, 1.0, 3.0).abs() < 1e-6


def _agreement(student, teacher, x):
    with torch.no_grad():
        return (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()


def test_the_student_learns_the_teacher_not_the_labels():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    noise = torch.randint(0, 4, (512,))  # labels with nothing to learn: only the teacher has a signal
    loader = DataLoader(TensorDataset(x, noise), batch_size=64, shuffle=True)
    teacher = nn.Linear(16, 4).eval()
    students = []
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        student = nn.Linear(16, 4)
        train(student, loader, 15, torch.device("cpu"), lr=0.1, quiet=True,
              distill=Distill(teacher, weight=weight, temperature=2.0), task=CLASSIFICATION)
        students.append(_agreement(student, teacher, x))
    assert students[1] > 0.9 > 0.5 > students[0]


def test_bad_distillation_settings_are_refused():
    with pytest.raises(AutopruneError, match="weight"):
        Distill(nn.Identity(), weight=1.5)
    with pytest.raises(AutopruneError, match="temperature"):
        Distill(nn.Identity(), temperature=0)
    assert from_settings(nn.Identity(), {}) is None
    kd = from_settings(nn.Identity(), {"distill": {"weight": 0.3, "temperature": 2}})
    assert (kd.weight, kd.temperature) == (0.3, 2.0)


def test_export_of_a_distilled_study_distills_as_the_search_did(tiny_run, tmp_path, monkeypatch):
    # The search's final fine-tune reads the distillation settings from the study; export must too.
    import shutil

    import optuna

    import autoprune.export.final
    from autoprune.api import export_trial

    run = shutil.copytree(tiny_run, tmp_path / "run")
    study = optuna.load_study(study_name="tiny_models-digits-flops0.4", storage=f"sqlite:///{run / 'study.db'}")
    study.set_user_attr("final_extra", {"distill": {"weight": 0.3, "temperature": 2.0}})
    seen = []
    monkeypatch.setattr(autoprune.export.final, "train", lambda *args, distill=None, **kwargs: seen.append(distill))
    summary = export_trial("tiny_models-digits-flops0.4", run_dir=run, final_epochs=0.1, repeats=1, quiet=True)
    assert [(kd.weight, kd.temperature) for kd in seen] == [(0.3, 2.0)]
    assert summary["distill"] == {"weight": 0.3, "temperature": 2.0}
