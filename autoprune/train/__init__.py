"""Training, fine-tuning and scoring a model, with distillation and soft pruning."""

from autoprune.train.loop import evaluate, recalibrate_bn, resolve_device, train
from autoprune.train.distill import Distill
from autoprune.train.soft import soft_prune
from autoprune.train.teacher import TeacherOutputs, teacher_outputs

__all__ = ["evaluate", "recalibrate_bn", "resolve_device", "train", "Distill", "soft_prune", "TeacherOutputs",
           "teacher_outputs"]
