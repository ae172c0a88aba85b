"""Semantic segmentation for autoprune: Fashion-MNIST items pasted on small canvases.

Give autoprune this file's three factories::

    autoprune search --model examples/segmentation/fmnist_seg.py:model \\
        --dataset examples/segmentation/fmnist_seg.py:data \\
        --task examples/segmentation/fmnist_seg.py:task --budget flops=0.5

- :func:`model`: torchvision's LR-ASPP MobileNetV3-Large, returning ``{"out": (N, 11, H, W)}``.
- :func:`data`: (train, val, test) datasets of ``(image (3, H, W), mask (H, W))``; mask 0 is
  background and ``class + 1`` marks each item's pixels.
- :func:`task`: per-pixel cross-entropy to train, mean IoU over the 11 classes to score.

Everything is built offline from Debian's Fashion-MNIST (``apt-get install dataset-fashion-mnist``),
deterministically and in memory. ``FMNIST_SEG_SMALL=1`` makes the data tiny (a few dozen
32×32 canvases) for tests; ``FMNIST_DIR`` points at another folder of the idx files.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from autoprune.inputs.data import read_idx
from autoprune.inputs.task import Task

NUM_CLASSES = 11  # background + the 10 Fashion-MNIST classes
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Canvases per split and canvas side. Full: ~40 s per training epoch of LR-ASPP on one CPU core,
# about a second to score val (scored once per sensitivity cell and trial). Small: for tests.
FULL = {"train": 4000, "val": 256, "test": 1000, "canvas": 64}
SMALL = {"train": 48, "val": 16, "test": 16, "canvas": 32}
VAL_SOURCES = 10000  # Fashion-MNIST train images held out: val canvases never reuse a train item
ITEMS = (2, 3)  # items per canvas, both ends included
ITEM = 28 / 64  # an item's side as a share of the canvas's: Fashion-MNIST's 28 pixels on 64
SCALE = (0.8, 1.2)  # each item's side is ITEM times the canvas's, times a draw from this range
PLACES = 8  # candidate positions per item; the least-overlapping one wins
INK = 0.1  # pixels brighter than this (of 1) belong to the item; the rest stay what was under them
MEAN, STD = 0.135, 0.275  # of the full train canvases' pixels (three quarters are empty background)
SEEDS = {"train": 1, "val": 2, "test": 3}


class Canvases(Dataset):
    """Gray canvases kept once as (N, 1, H, W), seen as three channels, with their (N, H, W) masks."""

    num_classes = NUM_CLASSES  # read by autoprune: the masks alone don't say how many classes exist

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].expand(3, -1, -1), self.masks[index]


def model(num_classes: int = NUM_CLASSES) -> nn.Module:
    """LR-ASPP MobileNetV3-Large from scratch (3.2M parameters, 34M MACs at 64×64), its BatchNorm
    momentum PyTorch's default 0.1."""
    net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        num_classes=num_classes, weights=None, weights_backbone=None)
    # torchvision's 0.01 suits ImageNet-length training; over the few hundred steps of a CPU run the
    # running statistics lag the weights so far that eval mode predicts background everywhere.
    for layer in net.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = 0.1
    return net


def data() -> tuple[Canvases, Canvases, Canvases]:
    """Train, val and test canvases: train and val from disjoint parts of Fashion-MNIST's train
    split, test from its t10k split. ``FMNIST_SEG_SMALL=1`` gives the tiny sizes."""
    sizes = SMALL if os.environ.get("FMNIST_SEG_SMALL", "") not in ("", "0") else FULL
    return _build(Path(os.environ.get("FMNIST_DIR", FMNIST_DIR)), tuple(sizes.items()))


def task() -> Task:
    """Per-pixel cross-entropy to train; mean IoU over all 11 classes, background included, to score;
    the class outputs and the squeeze-and-excitation bottlenecks never pruned."""
    return Task(loss=pixel_cross_entropy, score=mean_iou, name="mIoU", format="{:.4f}", keep=(
        # Both head convolutions emit the class maps (added together): their outputs are the classes.
        "classifier.low_classifier", "classifier.high_classifier",
        # Squeeze-and-excitation bottlenecks run on 1×1 maps: under 1% of the FLOPs each, not worth
        # 8 of the 30 groups a sensitivity scan measures. Their blocks' expansions are still pruned.
        "backbone.*.block.2.fc1"))


def pixel_cross_entropy(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every pixel's logits against its mask label."""
    images, masks = batch
    return F.cross_entropy(net(images)["out"], masks)


def mean_iou(net: nn.Module, loader: Iterable) -> float:
    """Mean over the 11 classes of each class's IoU on the whole loader (one confusion matrix
    for all its pixels, as Pascal VOC counts it, background a class like the others)."""
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = None
    for images, masks in loader:
        if metric is None:  # on the batches' device, which only the loader knows
            metric = MulticlassJaccardIndex(NUM_CLASSES, average="macro").to(masks.device)
        metric.update(net(images)["out"].argmax(dim=1), masks)
    return metric.compute().item() if metric is not None else 0.0


@lru_cache(maxsize=2)  # autoprune may ask for the data more than once in a process
def _build(folder: Path, sizes: tuple[tuple[str, int], ...]) -> tuple[Canvases, Canvases, Canvases]:
    """The three splits at ``sizes`` (canvases per split, canvas side), each from its own source images."""
    size = dict(sizes)
    train_images, train_labels = _fashion_mnist(folder, "train")
    test_images, test_labels = _fashion_mnist(folder, "t10k")
    order = np.random.default_rng(0).permutation(len(train_labels))
    held, kept = order[:VAL_SOURCES], order[VAL_SOURCES:]
    sources = {"train": (train_images[kept], train_labels[kept]), "val": (train_images[held], train_labels[held]),
               "test": (test_images, test_labels)}
    return tuple(_canvases(*sources[s], size[s], size["canvas"], SEEDS[s]) for s in ("train", "val", "test"))


def _fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's (N, 28, 28) uint8 images and (N,) labels, or an error saying how to get them."""
    paths = [folder / f"{split}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    paths = [p if p.is_file() else p.with_suffix("") for p in paths]  # gzipped or not
    if not all(p.is_file() for p in paths):
        raise FileNotFoundError(f"Fashion-MNIST's {split} idx files are not in {folder}: apt-get install "
                                "dataset-fashion-mnist, or set FMNIST_DIR to a folder holding them")
    return read_idx(paths[0], 3), read_idx(paths[1], 1)


def _canvases(images: np.ndarray, labels: np.ndarray, count: int, side: int, seed: int) -> Canvases:
    """``count`` canvases of ``side``² pixels, each with ``ITEMS`` (2–3) items of ``images`` pasted on it."""
    rng = np.random.default_rng(seed)
    per_canvas = rng.integers(ITEMS[0], ITEMS[1] + 1, size=count)
    picks = rng.integers(len(labels), size=per_canvas.sum())
    widths = np.minimum(side, np.rint(ITEM * side * rng.uniform(*SCALE, size=len(picks)))).astype(int)
    items = _resize(images[picks], widths)
    canvas = np.zeros((count, side, side), np.float32)
    mask = np.zeros((count, side, side), np.int64)
    first = np.concatenate([[0], np.cumsum(per_canvas)])
    for n in range(count):
        for i in range(first[n], first[n + 1]):
            y, x = _place(mask[n] > 0, widths[i], rng)
            _paste(canvas[n], mask[n], items[i], int(labels[picks[i]]) + 1, y, x)
    images_out = torch.from_numpy(canvas).sub_(MEAN).div_(STD).unsqueeze(1)
    return Canvases(images_out, torch.from_numpy(mask))


def _resize(images: np.ndarray, widths: np.ndarray) -> list[np.ndarray]:
    """uint8 28×28 items as floats in [0, 1], each at its width² (antialiased when it shrinks);
    resized a width at a time: one interpolate call per item took most of the build time."""
    out: list[np.ndarray] = [np.empty(0)] * len(images)
    for width in np.unique(widths):
        chosen = np.flatnonzero(widths == width)
        batch = torch.from_numpy(images[chosen].astype(np.float32) / 255).unsqueeze(1)
        resized = F.interpolate(batch, size=(int(width),) * 2, mode="bilinear", antialias=True, align_corners=False)
        for i, item in zip(chosen, resized[:, 0].numpy()):
            out[i] = item
    return out


def _place(taken: np.ndarray, width: int, rng: np.random.Generator) -> tuple[int, int]:
    """The top-left corner, of a few random ones, that covers the fewest labelled pixels: items
    mostly sit apart, but may overlap where the canvas is crowded."""
    corners = rng.integers(0, taken.shape[0] - width + 1, size=(PLACES, 2))
    area = np.pad(taken.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table: any box's count in O(1)
    y, x = corners[:, 0], corners[:, 1]
    covered = area[y + width, x + width] - area[y, x + width] - area[y + width, x] + area[y, x]
    best = int(np.argmin(covered))
    return int(y[best]), int(x[best])


def _paste(canvas: np.ndarray, mask: np.ndarray, item: np.ndarray, label: int, y: int, x: int) -> None:
    """Put ``item`` on top at (y, x): its ink replaces what was there and takes its label;
    its faint edges only brighten what is under them."""
    ink = item > INK
    box = np.s_[y:y + item.shape[0], x:x + item.shape[1]]
    canvas[box] = np.where(ink, item, np.maximum(canvas[box], item))
    mask[box][ink] = label
