"""Tasks that are not classification, as a user writes them: tiny models, data and tasks for the tests.

Each task comes with a model factory and a data factory, so the CLI can take all three from this file
(``--model tests/user_tasks.py:segmenter --dataset tests/user_tasks.py:segmentation_data
--task tests/user_tasks.py:segmentation``). The data are learnable in a few epochs and made from a seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassJaccardIndex
from torchvision.ops import box_iou

from autoprune import Task


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def _splits(make, sizes=(192, 64, 64)) -> tuple[TensorDataset, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(TensorDataset(*make(n, generator)) for n in sizes)


# Dense prediction: a pixel's class is how bright its first channel is (3 classes); the output is a dict.

class Segmenter(nn.Module):
    """An encoder, a decoder and a 1×1 classifier, returning ``{"out": (N, 3, H, W)}`` as torchvision's do."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_block(3, 16), _block(16, 32, 2), _block(32, 32))
        self.decoder = _block(32, 16)
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.decoder(self.encoder(x))
        return {"out": F.interpolate(self.classifier(features), size=x.shape[-2:], mode="bilinear")}


def segmenter() -> nn.Module:
    return Segmenter()


def _segmentation(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = F.avg_pool2d(torch.randn(n, 3, 16, 16, generator=generator), 3, 1, 1) * 3
    masks = (images[:, 0] > -0.4).long() + (images[:, 0] > 0.4).long()
    return images, masks


def segmentation_data() -> tuple[TensorDataset, ...]:
    return _splits(_segmentation)


def _segmentation_loss(model: nn.Module, batch) -> torch.Tensor:
    images, masks = batch
    return F.cross_entropy(model(images)["out"], masks)


def _miou(model: nn.Module, loader) -> float:
    metric = MulticlassJaccardIndex(num_classes=3, average="macro")
    for images, masks in loader:
        metric.update(model(images)["out"].argmax(1).cpu(), masks.cpu())
    return float(metric.compute())


def segmentation() -> Task:
    return Task(_segmentation_loss, _miou, name="mIoU", format="{:.4f}")


# Detector-shaped: called with a list of images, returns a dict per image in eval mode and a dict of losses
# in training mode (as torchvision's detectors do); one object per image, its box and class to find.

class Detector(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_block(3, 16, 2), _block(16, 32, 2), _block(32, 32))
        self.neck = _block(32, 32)
        self.box_head = nn.Linear(32, 4)
        self.class_head = nn.Linear(32, classes)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        pooled = self.neck(self.backbone(torch.stack(images))).mean((2, 3))
        boxes, logits = self.box_head(pooled).sigmoid() * images[0].shape[-1], self.class_head(pooled)
        if self.training and targets is not None:
            return {"box": F.smooth_l1_loss(boxes, torch.cat([t["boxes"] for t in targets]) ),
                    "class": F.cross_entropy(logits, torch.cat([t["labels"] for t in targets]))}
        scores, labels = logits.softmax(1).max(1)
        return [{"boxes": b[None], "scores": s[None], "labels": c[None]} for b, s, c in zip(boxes, scores, labels)]


def detector() -> nn.Module:
    return Detector()


def _detection(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randn(n, 3, 24, 24, generator=generator) * 0.1
    corners = torch.randint(0, 12, (n, 2), generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    for image, (x, y), label in zip(images, corners.tolist(), labels.tolist()):
        image[label, y:y + 12, x:x + 12] += 1.0  # the object's class is the channel it lights
    boxes = torch.cat([corners, corners + 12], 1).float()
    return images, boxes, labels


def _collate(samples: list) -> tuple[list[torch.Tensor], list[dict]]:
    return ([image for image, _, _ in samples],
            [{"boxes": box[None], "labels": label[None]} for _, box, label in samples])


def detection_data() -> tuple[DataLoader, ...]:
    """DataLoaders with their own collate_fn and batch size, as a detection user builds them."""
    train, val, test = _splits(_detection)
    return (DataLoader(train, batch_size=16, shuffle=True, collate_fn=_collate,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=32, collate_fn=_collate), DataLoader(test, batch_size=32, collate_fn=_collate))


def _detection_loss(model: nn.Module, batch) -> torch.Tensor:
    images, targets = batch
    return sum(model(images, targets).values())


def _box_score(model: nn.Module, loader) -> float:
    """Mean IoU of each image's box with the true one, counted only where the class is right."""
    total, seen = 0.0, 0
    for images, targets in loader:
        for found, true in zip(model(images), targets):
            right = bool((found["labels"] == true["labels"]).all())
            total += float(box_iou(found["boxes"], true["boxes"])[0, 0]) if right else 0.0
            seen += 1
    return total / max(seen, 1)


def _images(batch) -> list[torch.Tensor]:
    return list(batch[0])


def detection() -> Task:
    return Task(_detection_loss, _box_score, inputs=_images, name="box IoU", keep=("box_head", "class_head"))


# Regression: the target is a weighted sum of the image's mean colours; the score is minus the mean error.

def regressor() -> nn.Module:
    return nn.Sequential(_block(3, 16, 2), _block(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))


def _regression(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(n, 3, 16, 16, generator=generator) + torch.randn(n, 3, 1, 1, generator=generator)
    return images, images.mean((2, 3)) @ torch.tensor([[1.0], [-2.0], [0.5]])


def regression_data() -> tuple[TensorDataset, ...]:
    return _splits(_regression)


def _mse(model: nn.Module, batch) -> torch.Tensor:
    images, targets = batch
    return F.mse_loss(model(images), targets)


def _minus_mae(model: nn.Module, loader) -> float:
    errors = [(model(images) - targets).abs().flatten() for images, targets in loader]
    return -float(torch.cat(errors).mean())


def regression() -> Task:
    return Task(_mse, _minus_mae, name="-MAE", format="{:.4f}")


# Tasks that are wrong, each in one way: the CLI must refuse them in one line.

def nan_score() -> Task:
    return Task(_mse, lambda model, loader: float("nan"), name="-MAE")


def vector_loss() -> Task:
    return Task(lambda model, batch: (model(batch[0]) - batch[1]).abs(), _minus_mae, name="-MAE")


def wrong_inputs() -> Task:
    return Task(_mse, _minus_mae, inputs=lambda batch: batch[1], name="-MAE")


def not_a_task() -> dict:
    return {"loss": _mse}
