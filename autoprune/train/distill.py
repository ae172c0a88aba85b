"""Knowledge distillation: the unpruned base model teaches the pruned one while it is fine-tuned.

The loss is Hinton et al.'s: ``(1 - weight) * CE(student, labels) + weight * T² *
KL(softmax(teacher / T) || softmax(student / T))``. The T² keeps the soft term's
gradients on the scale of the hard term's whatever the temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from autoprune.errors import AutopruneError


@dataclass(frozen=True)
class Distill:
    """A teacher and how much its softened predictions count.

    Example:
        >>> kd = Distill(teacher=base_model, weight=0.5, temperature=4.0)
        >>> train(pruned, loader, 1, device, distill=kd)
    """

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0

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


def from_settings(teacher: nn.Module, extra: dict) -> Distill | None:
    """The ``Distill`` a study's settings ask for (``extra["distill"]`` holds weight and temperature)."""
    options = extra.get("distill")
    if not options:
        return None
    return Distill(teacher, float(options["weight"]), float(options["temperature"]))
