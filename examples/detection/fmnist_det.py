"""Object detection for autoprune: SSDlite finding Fashion-MNIST items on small canvases.

A user file for ``autoprune search --model ...:model --dataset ...:data --task ...:task``.
Each canvas holds 1–3 Fashion-MNIST items, randomly scaled and placed without
overlapping; each item's box is the tight box around its visible pixels and its
label is its Fashion-MNIST class + 1 (0 is the background in torchvision's detectors).
Everything is built offline from Debian's ``dataset-fashion-mnist`` files, with
fixed seeds, once, into memory.

``FMNIST_DET_SMALL=1`` gives a tiny version (a few dozen 64-pixel canvases) for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from autoprune.inputs.data import read_idx
from autoprune.inputs.task import Task

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HELD_OUT = 10_000  # the last items of FMNIST's train split: the val canvases' items, never trained on
INK = 25  # a pixel above this (of 255) is part of an item: its box is tight around these


@dataclass(frozen=True)
class Config:
    """The example's sizes: the full one, or the tiny one ``FMNIST_DET_SMALL=1`` asks for."""

    size: int  # canvases are size × size pixels, and the model's fixed input size
    train: int  # canvases per split
    val: int
    test: int
    batch_size: int
    item_scale: tuple[float, float] = (1.0, 1.6)  # an item's side is 28 × this × size / 128 pixels
    max_items: int = 3


def config() -> Config:
    """The sizes for this run, read when called, so a test may set the variable after importing."""
    if os.environ.get("FMNIST_DET_SMALL", "") not in ("", "0"):
        return Config(size=64, train=48, val=16, test=16, batch_size=8)
    return Config(size=128, train=3000, val=400, test=400, batch_size=32)


# ---- model -----------------------------------------------------------------------------------


def model(num_classes: int = 11) -> nn.Module:
    """SSDlite (MobileNetV3-Large, from scratch) for ``config().size``-pixel canvases.

    ``num_classes`` counts the background: 10 Fashion-MNIST classes + 1.
    """
    size = config().size
    net = ssdlite320_mobilenet_v3_large(num_classes=num_classes, weights=None, weights_backbone=None)
    # The builder fixes 320 × 320 and refuses size=; the transform is what resizes, so set it here.
    net.transform.fixed_size = (size, size)
    net.transform.min_size = (size,)
    net.transform.max_size = size
    # Items are at most 0.35 of the canvas, not COCO's up to 0.95: default boxes from 0.2 to 0.5 of
    # it give each item more positives (2.5 boxes of IoU ≥ 0.5 on average, not 2.0). Smaller ones
    # match worse: the finest map has a 16-pixel stride. Still six boxes per location (ratios 2, 3),
    # so the head keeps its shape.
    net.anchor_generator = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.5)
    # At most 3 objects per canvas: a short candidate list keeps NMS and the mAP pass fast.
    net.score_thresh = 0.01
    net.topk_candidates = 100
    net.detections_per_img = 100
    return net


# ---- data ------------------------------------------------------------------------------------


def _fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """FMNIST's ``train`` or ``t10k`` images (N, 28, 28) and labels (N,), as uint8."""
    images, labels = FMNIST_DIR / f"{split}-images-idx3-ubyte.gz", FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        raise FileNotFoundError(f"Fashion-MNIST is not in {FMNIST_DIR}; install it with "
                                "`apt-get install dataset-fashion-mnist`")
    return read_idx(images, 3), read_idx(labels, 1)


def _scaled(item: np.ndarray, side: int) -> np.ndarray:
    """A 28 × 28 uint8 item resized to ``side`` × ``side`` (bilinear, antialiased)."""
    x = torch.tensor(item, dtype=torch.float32)[None, None]  # a copy: read_idx's array is read-only
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _tight_box(patch: np.ndarray, x: int, y: int) -> list[float] | None:
    """The xyxy pixel box of the patch's ink, placed at (x, y); None if it has none."""
    rows, cols = np.nonzero(patch > INK)
    if rows.size == 0:
        return None
    return [x + cols.min(), y + rows.min(), x + cols.max() + 1.0, y + rows.max() + 1.0]


def _free(spot: tuple[int, int, int], taken: list[tuple[int, int, int]]) -> bool:
    """Whether a square (x, y, side) overlaps none of the squares already placed."""
    x, y, s = spot
    return all(x + s <= a or a + t <= x or y + s <= b or b + t <= y for a, b, t in taken)


def _canvas(items: np.ndarray, labels: np.ndarray, cfg: Config, rng: np.random.Generator
            ) -> tuple[np.ndarray, list[list[float]], list[int]]:
    """One canvas with 1–``max_items`` items drawn from ``items``, their boxes and labels (+1)."""
    canvas = np.zeros((cfg.size, cfg.size), np.uint8)
    taken: list[tuple[int, int, int]] = []
    boxes: list[list[float]] = []
    classes: list[int] = []
    for _ in range(rng.integers(1, cfg.max_items + 1)):
        k = int(rng.integers(len(items)))
        side = round(28 * rng.uniform(*cfg.item_scale) * cfg.size / 128)
        for _try in range(20):  # a spot that overlaps no other item; if none is found, one item fewer
            spot = (int(rng.integers(cfg.size - side + 1)), int(rng.integers(cfg.size - side + 1)), side)
            if _free(spot, taken):
                break
        else:
            continue
        patch = _scaled(items[k], side)
        box = _tight_box(patch, spot[0], spot[1])
        if box is None:
            continue
        canvas[spot[1]:spot[1] + side, spot[0]:spot[0] + side] = patch
        taken.append(spot)
        boxes.append(box)
        classes.append(int(labels[k]) + 1)
    return canvas, boxes, classes


class Canvases(Dataset):
    """Canvases held in memory as uint8; a sample is ``(image (3, S, S) float in [0, 1], target)``."""

    def __init__(self, items: np.ndarray, labels: np.ndarray, count: int, cfg: Config, seed: int) -> None:
        rng = np.random.default_rng(seed)
        built = [_canvas(items, labels, cfg, rng) for _ in range(count)]
        self.images = torch.from_numpy(np.stack([c for c, _, _ in built]))
        self.boxes = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for _, b, _ in built]
        self.labels = [torch.tensor(c, dtype=torch.int64) for _, _, c in built]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Grey to the three channels MobileNetV3 takes; a copy, so no caller can change the canvas.
        image = self.images[i].float().div(255).repeat(3, 1, 1)
        return image, {"boxes": self.boxes[i].clone(), "labels": self.labels[i].clone()}


def collate(samples: Sequence[tuple[torch.Tensor, dict]]) -> tuple[tuple, tuple]:
    """Samples to ``(images, targets)``: detectors take lists of images, not one stacked tensor."""
    return tuple(zip(*samples))  # type: ignore[return-value]


def data() -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train, val and test loaders of ``(images, targets)`` batches.

    Train canvases use FMNIST's train split less its last ``HELD_OUT`` items, val those
    held-out items, test FMNIST's t10k split. Train is shuffled (seeded) and drops a short
    last batch: SSDlite's extra layers have BatchNorm on 1 × 1 maps, which a batch of one breaks.
    """
    cfg = config()
    train_items, train_labels = _fmnist("train")
    test_items, test_labels = _fmnist("t10k")
    train = Canvases(train_items[:-HELD_OUT], train_labels[:-HELD_OUT], cfg.train, cfg, seed=0)
    val = Canvases(train_items[-HELD_OUT:], train_labels[-HELD_OUT:], cfg.val, cfg, seed=1)
    test = Canvases(test_items, test_labels, cfg.test, cfg, seed=2)
    shuffle = torch.Generator().manual_seed(0)
    return (
        DataLoader(train, cfg.batch_size, shuffle=True, generator=shuffle, drop_last=True, collate_fn=collate),
        DataLoader(val, cfg.batch_size, collate_fn=collate),
        DataLoader(test, cfg.batch_size, collate_fn=collate),
    )


# ---- task ------------------------------------------------------------------------------------


def images(batch: tuple[Sequence[torch.Tensor], Any]) -> list[torch.Tensor]:
    """What the detector is called with: the batch's images, as a list."""
    return list(batch[0])


def loss(net: nn.Module, batch: tuple[Sequence[torch.Tensor], Sequence[dict]]) -> torch.Tensor:
    """SSD's training loss: box regression + classification (train mode returns them as a dict)."""
    losses = net(list(batch[0]), list(batch[1]))
    return sum(losses.values())  # type: ignore[return-value]


def map50(net: nn.Module, loader: Any) -> float:
    """mAP at IoU 0.5 over the loader (torchmetrics, COCO's own evaluation through pycocotools)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_thresholds=[0.5], backend="pycocotools")
    for batch in loader:
        found = net(images(batch))
        metric.update([{k: v.cpu() for k, v in d.items()} for d in found],
                      [{k: v.cpu() for k, v in t.items()} for t in batch[1]])
    return float(metric.compute()["map_50"])


def task() -> Task:
    """Detection: SSD's loss, mAP@0.5, and the head's class and box convolutions never pruned."""
    return Task(loss, map50, inputs=images, name="mAP@0.5", format="{:.4f}", keep=("head.*",), collate_fn=collate)
