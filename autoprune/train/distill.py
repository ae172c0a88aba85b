"""Knowledge distillation: the unpruned base model teaches the pruned one while it is fine-tuned.

For classification the loss is Hinton et al.'s: ``(1 - weight) * CE(student, labels) + weight * T² *
KL(softmax(teacher / T) || softmax(student / T))``. The T² keeps the soft term's
gradients on the scale of the hard term's whatever the temperature. Another task
distills with its own ``Task.distill_loss(student_output, teacher_output, batch)``.

The teacher's outputs come from :class:`~autoprune.train.teacher.TeacherOutputs`, computed
once per run, where a ``Distill`` has them and the loader is over the data they were
computed on; else the teacher runs live in every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autoprune.errors import AutopruneError
from autoprune.inputs.task import Task
from autoprune.train.teacher import TeacherOutputs


@dataclass(frozen=True)
class Distill:
    """A teacher, how much its softened predictions count, and its outputs computed once (or None: live).

    ``weight`` and ``temperature`` shape :func:`kd_loss` (classification); a task's own
    ``distill_loss`` blends as it likes.

    Example:
        >>> kd = Distill(teacher=base_model, weight=0.5, temperature=4.0)
        >>> train(pruned, loader, 1, device, distill=kd)
    """

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0
    outputs: TeacherOutputs | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise AutopruneError(f"distillation weight must lie in [0, 1], not {self.weight}")
        if self.temperature <= 0:
            raise AutopruneError(f"distillation temperature must be positive, not {self.temperature}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            weight: float = 0.5, temperature: float = 4.0) -> torch.Tensor:
    """Cross-entropy on the labels blended with the temperature-softened KL to the teacher.

    Example:
        >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), weight=1.0)
        tensor(0.)
    """
    hard = F.cross_entropy(student_logits, targets)
    if weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - weight) * hard + weight * soft


def distill_loss(distill: Distill, task: Task, model: nn.Module, batch: Any, teacher_output: Any) -> torch.Tensor:
    """One batch's distillation loss: the task's own ``distill_loss`` where it gives one, else
    :func:`kd_loss` on a classifier's logits and labels. ``model`` is called as the task calls it."""
    student_output = task.call(model, batch)
    if task.distill_loss is not None:
        return task.distilled_loss(student_output, teacher_output, batch)
    _, targets = batch
    return kd_loss(student_output, teacher_output, targets, distill.weight, distill.temperature)


def from_settings(teacher: nn.Module, extra: dict, outputs: TeacherOutputs | None = None) -> Distill | None:
    """The ``Distill`` a study's settings ask for (``extra["distill"]`` holds weight and temperature),
    with the teacher's ``outputs`` computed once where there are (None: the teacher runs live)."""
    options = extra.get("distill")
    if not options:
        return None
    return Distill(teacher, float(options["weight"]), float(options["temperature"]), outputs)
