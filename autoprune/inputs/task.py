"""What a model is trained and judged on: the user's task.

A :class:`Task` says how to train a model on a batch (its loss), how to judge a
model on a loader (its score, higher is better: accuracy, mIoU, mAP, −MAE), and
how a batch becomes the model's input. Every stage that trains or judges goes
through one; classification (:data:`CLASSIFICATION`) is the default, not a
special path.

Example:
    >>> import torch.nn.functional as F
    >>> def loss(model, batch):
    ...     images, masks = batch
    ...     return F.cross_entropy(model(images)["out"], masks)
    >>> def miou(model, loader):
    ...     ...  # e.g. torchmetrics' MeanIoU over the loader's batches
    >>> seg = Task(loss, miou, name="mIoU", keep=("classifier.*",))
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autoprune.errors import AutopruneError
from autoprune.inputs.models import call_user, load_attribute


def first(batch: Any) -> Any:
    """The default :attr:`Task.inputs`: a batch's first element (``images`` of ``(images, labels)``)."""
    return batch[0]


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in ``batch`` (nested tuples, lists and dicts) moved to ``device``.

    Example:
        >>> to_device([torch.zeros(1), {"boxes": torch.zeros(2, 4)}], torch.device("cpu"))[1]["boxes"].shape
        torch.Size([2, 4])
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def head(inputs: Any, n: int = 1) -> Any:
    """The first ``n`` samples of a model input: a batched tensor, or a list of per-image tensors."""
    if isinstance(inputs, (torch.Tensor, list, tuple)):
        return inputs[:n]
    raise AutopruneError(f"the task's inputs(batch) gave {type(inputs).__name__}; give the model's input as a "
                         "batched tensor or a list of per-image tensors")


def sample_shape(inputs: Any) -> tuple[int, ...]:
    """The shape of one sample of a model input (an image's (C, H, W))."""
    return tuple(inputs[0].shape)


@dataclass(frozen=True)
class Task:
    """What a model is trained and judged on.

    Args:
        loss: ``loss(model, batch) -> scalar tensor``, the training loss for one
            batch (on the device), the forward pass included.
        score: ``score(model, loader) -> float``, higher is better. ``loader``
            yields batches already on the model's device; the model is in eval mode.
        inputs: ``inputs(batch)``: what the model is called with (``model(inputs(batch))``);
            it traces the dependency graph, counts FLOPs, recalibrates BatchNorm
            and times latency. A batched tensor or a list of image tensors (as
            torchvision's detectors take).
        name: the score's name, shown beside every number (``accuracy``, ``mIoU``, ``mAP@0.5``).
        format: how a score prints (``{:.2%}``, ``{:.4f}``).
        keep: layer name patterns (fnmatch) never pruned, such as a head's class and box outputs.
        to_device: moves a batch to the device (default: every tensor in it).
        collate_fn: joins samples into a batch where autoprune builds the loader from datasets.
        optimizer: ``optimizer(params, lr) -> torch.optim.Optimizer`` for every fine-tune
            (default: SGD, Nesterov momentum 0.9, weight decay 5e-4).
        schedule: ``schedule(optimizer, steps) -> LRScheduler`` (default: cosine to zero over
            the steps; a fine-tune given seconds always uses the time-based cosine).
        distill_loss: ``distill_loss(student_output, teacher_output, batch) -> scalar tensor``, the
            whole training loss for one batch under ``--distill`` (blend in ``loss``'s term as you
            like; ``--distill-weight`` and ``--temperature`` are not applied). ``student_output`` is
            the model in training mode called on ``inputs(batch)``; ``teacher_output`` the unpruned
            base model's, in eval mode, no gradient. Without it ``--distill`` takes classification
            only (Hinton's loss on the logits).
    """

    loss: Callable[[nn.Module, Any], torch.Tensor]
    score: Callable[[nn.Module, Iterable], float]
    inputs: Callable[[Any], Any] = first
    name: str = "score"
    format: str = "{:.4f}"
    keep: Sequence[str] = ()
    to_device: Callable[[Any, torch.device], Any] = to_device
    collate_fn: Callable[[list], Any] | None = None
    optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer] | None = None
    schedule: Callable[[torch.optim.Optimizer, int], Any] | None = None
    distill_loss: Callable[[Any, Any, Any], torch.Tensor] | None = None
    spec: str = field(default="", compare=False)  # where it came from (``file.py:name``), for the study's record

    def show(self, value: float) -> str:
        """``value`` as this task prints it (``97.50%``, ``0.6123``)."""
        return self.format.format(value)

    @property
    def is_classification(self) -> bool:
        return self.loss is cross_entropy

    def batch_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The task's loss for one batch, refused in one line unless it is a finite scalar tensor."""
        return self._scalar(self.loss(model, batch), "loss(model, batch)")

    def distilled_loss(self, student_output: Any, teacher_output: Any, batch: Any) -> torch.Tensor:
        """The task's own distillation loss for one batch, refused in one line unless a scalar tensor."""
        assert self.distill_loss is not None
        return self._scalar(self.distill_loss(student_output, teacher_output, batch),
                            "distill_loss(student_output, teacher_output, batch)")

    def _scalar(self, loss: Any, what: str) -> torch.Tensor:
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
            found = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise AutopruneError(f"task {self.label}: {what} returned {found}; return a scalar tensor "
                                 "(e.g. the mean of the per-sample losses)")
        return loss

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device) -> float:
        """The task's score of ``model`` on ``loader``, refused in one line unless a finite number."""
        model.to(device).eval()
        with torch.no_grad():
            value = self.score(model, OnDevice(loader, device, self))
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AutopruneError(f"task {self.label}: score(model, loader) returned {value!r}; return a finite "
                                 "number, higher is better (e.g. accuracy, mIoU, or minus an error)")
        return float(value)

    def call(self, model: nn.Module, batch: Any) -> Any:
        """``model`` on the batch's inputs, as every stage that only runs the model calls it."""
        return model(self.inputs(batch))

    @property
    def label(self) -> str:
        return self.spec or self.name


class OnDevice:
    """A loader whose batches arrive on ``device`` (the task's ``to_device``), as ``score`` receives it."""

    def __init__(self, loader: Iterable, device: torch.device, task: Task) -> None:
        self.loader, self.device, self.task = loader, device, task

    def __iter__(self) -> Iterator:
        return (self.task.to_device(batch, self.device) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """Classification's loss: cross-entropy of ``model(images)`` against class indices."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def accuracy(model: nn.Module, loader: Iterable) -> float:
    """Classification's score: top-1 accuracy."""
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(dim=1) == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


CLASSIFICATION = Task(cross_entropy, accuracy, name="accuracy", format="{:.2%}", spec="classification")


def cpu_example(inputs: Any) -> Any:
    """One sample of a model input, detached on the CPU: what graphs are traced and thop counts on."""
    return to_device(head(inputs) if isinstance(inputs, (list, tuple)) else inputs.detach()[:1], torch.device("cpu"))


def shape_signature(output: Any) -> Any:
    """An output's structure with each tensor's shape past its first dimension.

    A pruned model must give the same signature as its base: a classifier's (10,),
    a segmenter's {'out': (11, 64, 64)}, a detector's [{'boxes': (4,), ...}] (how
    many boxes it finds is its first dimension, free to change).
    """
    if isinstance(output, torch.Tensor):
        return tuple(output.shape[1:])
    if isinstance(output, dict):
        return {k: shape_signature(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(shape_signature(v) for v in output)
    return type(output).__name__


def load_task(spec: Task | str | None) -> Task:
    """``--task``: a :class:`Task`, ``package.module:name`` or ``file.py:name`` of a factory returning
    one (or of a Task itself), or None for classification."""
    if spec is None or spec == "classification":
        return CLASSIFICATION
    if isinstance(spec, Task):
        return spec
    found = load_attribute(spec, "task")
    if not (isinstance(found, Task) or callable(found)):
        raise AutopruneError(f"task {spec} is a {type(found).__name__}; name a Task or a function returning one")
    made = found if isinstance(found, Task) else call_user(found, spec, "task")
    if not isinstance(made, Task):
        raise AutopruneError(f"task factory {spec} returned {type(made).__name__}, not an autoprune.Task; "
                             "return Task(loss=..., score=..., name=...)")
    return made if made.spec else replace(made, spec=spec)


def validate(task: Task, model: nn.Module, batch: Any, device: torch.device) -> None:
    """Run ``task`` once on a copy of ``model`` and one batch, so a task that does not fit the model
    or the data is refused in one line before anything is trained or written."""
    probe = copy.deepcopy(model).to(device).eval()
    batch = task.to_device(batch, device)
    steps = (("inputs(batch)", lambda: task.inputs(batch)),
             ("the model called with inputs(batch)", lambda: _no_grad(task.call, probe, batch)),
             ("loss(model, batch)", lambda: task.batch_loss(probe.train(), batch)),
             ("score(model, loader)", lambda: task.evaluate(probe, [batch], device)))
    for what, step in steps:
        try:
            with warnings.catch_warnings():  # a failing step's warnings would bury the one line that says why
                warnings.simplefilter("ignore")
                step()
        except AutopruneError:
            raise
        except Exception as err:
            raise AutopruneError(f"task {task.label}: {what} failed on the data's first validation batch "
                                 f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); give a model, "
                                 "data and task that fit each other") from None


def _no_grad(function: Callable, *args: Any) -> Any:
    with torch.no_grad():
        return function(*args)


SCORE = "score"  # study attribute: the name and print format of the trials' values


def score_record(task: Task) -> dict[str, str]:
    """What a study stores of its task's score, so pareto and report name and print it."""
    return {"name": task.name, "format": task.format}


@dataclass(frozen=True)
class Score:
    """How a stored study's values are named and printed (accuracy, as a percentage, for older studies).

    Example:
        >>> Score.of({"score": {"name": "mIoU", "format": "{:.4f}"}}).show(0.61234)
        '0.6123'
    """

    name: str = "accuracy"
    format: str = "{:.2%}"

    @classmethod
    def of(cls, attrs: dict[str, Any]) -> Score:
        """A study's score (its user attributes), or an export's (its summary)."""
        found = attrs.get(SCORE)
        if isinstance(found, dict):
            return cls(**found)
        return cls(found, attrs.get("score_format", "{:.4f}")) if found else cls()

    def show(self, value: float) -> str:
        return self.format.format(value)


def input_kind(example: Any) -> dict[str, str]:
    """What a plan records of its model's input, so it can be rebuilt with a zero input of that kind."""
    return {"input_kind": "list"} if isinstance(example, (list, tuple)) else {}


def zeros_like_input(meta: dict[str, Any]) -> Any:
    """A zero input of the shape and kind a plan's ``meta`` records: a batched tensor or a list of images."""
    shape = meta.get("input_shape")
    if not shape:
        raise AutopruneError("the plan does not record its input shape; it was not written by autoprune")
    return [torch.zeros(*shape)] if meta.get("input_kind") == "list" else torch.zeros(1, *shape)
