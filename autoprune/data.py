"""Data sets, split deterministically into train, validation and test.

The search sees train and validation only; the test split is touched once,
for the final report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, random_split

from .errors import AutopruneError
from .models import load_factory

TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
NAMES = ("digits", *TORCHVISION)
VAL_SHARE = 0.15
SCORE_IMAGES = 1000  # validation images that rank candidates: one image is 0.1 points


@dataclass
class Data:
    """Train, validation and test splits with what a model needs to know about them."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape)

    @property
    def score(self) -> Dataset:
        """The validation images that rank candidates (sensitivity cells, trials).

        Ranking needs far fewer images than reporting: with more than
        ``SCORE_IMAGES`` validation images, a fixed random subset of that many
        (seed 0, the same for every run and study) is used; the full split still
        scores the base model and the final one.
        """
        if len(self.val) <= SCORE_IMAGES:
            return self.val
        order = torch.randperm(len(self.val), generator=torch.Generator().manual_seed(0))
        return Subset(self.val, sorted(order[:SCORE_IMAGES].tolist()))

    def loader(self, split: str, batch_size: int = 64, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """Batches of ``train``, ``val``, ``test`` or ``score`` (see :attr:`score`)."""
        dataset = getattr(self, split)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=shuffle and len(dataset) > batch_size)


def _split(dataset: Dataset, share: float, seed: int) -> tuple[Subset, Subset]:
    held = max(1, int(round(len(dataset) * share)))
    first, second = random_split(dataset, [len(dataset) - held, held],
                                 generator=torch.Generator().manual_seed(seed))
    return first, second


def digits(seed: int = 0) -> Data:
    """scikit-learn's bundled 8×8 digits, upsampled to 32×32 with three channels (offline)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = ((images - images.mean()) / images.std()).repeat(1, 3, 1, 1)
    full = TensorDataset(images, torch.tensor(bunch.target, dtype=torch.long))
    rest, test = _split(full, 0.2, seed)
    train, val = _split(rest, VAL_SHARE, seed + 1)
    return Data("digits", train, val, test, 10, (3, 32, 32))


def _torchvision(name: str, data_dir: Path, download: bool, seed: int) -> Data:
    from torchvision import datasets, transforms

    gray = name in ("mnist", "fashion-mnist")
    steps = [transforms.Resize(32), transforms.Grayscale(3)] if gray else []
    transform = transforms.Compose([*steps, transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.25] * 3)])
    cls = getattr(datasets, TORCHVISION[name])
    try:
        full = cls(str(data_dir), train=True, download=download, transform=transform)
        test = cls(str(data_dir), train=False, download=download, transform=transform)
    except RuntimeError as err:
        raise AutopruneError(f"{name} is not in {data_dir} ({err}); pass --download to fetch it "
                             "or --data-dir to where it is") from None
    train, val = _split(full, 0.1, seed)
    return Data(name, train, val, test, len(full.classes), (3, 32, 32))


def _image_folder(root: Path, image_size: int, seed: int) -> Data:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    splits = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    try:
        if "train" in splits:
            train = datasets.ImageFolder(str(splits["train"]), transform=transform)
            classes = train.classes
            val = datasets.ImageFolder(str(splits["val"]), transform=transform) if "val" in splits else None
            test = datasets.ImageFolder(str(splits["test"]), transform=transform) if "test" in splits else None
            if test is None:
                train, test = _split(train, 0.2, seed)
            if val is None:
                train, val = _split(train, VAL_SHARE, seed + 1)
        else:
            full = datasets.ImageFolder(str(root), transform=transform)
            classes = full.classes
            rest, test = _split(full, 0.2, seed)
            train, val = _split(rest, VAL_SHARE, seed + 1)
    except (FileNotFoundError, RuntimeError) as err:
        raise AutopruneError(f"{root} is not an image folder ({err}); lay it out as "
                             "root/<class>/<image> or root/train/<class>/<image>") from None
    return Data(root.name, train, val, test, len(classes), (3, image_size, image_size))


def _factory(spec: str, seed: int) -> Data:
    made = load_factory(spec, "data")()
    if not (isinstance(made, (tuple, list)) and len(made) == 3):
        raise AutopruneError(f"data factory {spec} must return (train, val, test) datasets")
    train, val, test = made
    sample, _ = train[0]
    labels = {int(train[i][1]) for i in range(len(train))} if len(train) <= 20000 else set()
    num_classes = getattr(train, "num_classes", None) or (max(labels) + 1 if labels else None)
    if num_classes is None:
        raise AutopruneError(f"data factory {spec}: give the train set a num_classes attribute")
    return Data(spec, train, val, test, int(num_classes), tuple(sample.shape))


def load_data(spec: str, data_dir: str | Path = "data", download: bool = False,
              seed: int = 0, image_size: int = 64) -> Data:
    """Resolve ``--dataset``: a known name, an image-folder path, or ``file.py:factory``.

    Example:
        >>> data = load_data("digits")
        >>> data.num_classes, data.input_shape
        (10, (3, 32, 32))
    """
    key = spec.lower()
    if key == "digits":
        return digits(seed)
    if key in TORCHVISION:
        return _torchvision(key, Path(data_dir), download, seed)
    if ":" in spec and not Path(spec).is_dir():
        return _factory(spec, seed)
    if Path(spec).is_dir():
        return _image_folder(Path(spec), image_size, seed)
    raise AutopruneError(f"unknown data set {spec!r}; use one of {', '.join(NAMES)}, an image folder, "
                         "or path/to/file.py:factory returning (train, val, test)")


def batches_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return max(1, math.ceil(len(dataset) / batch_size))
