"""Data sets, split deterministically into train, validation and test.

The search sees train and validation only; the test split is touched once,
for the final report.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, random_split

from autoprune.errors import AutopruneError
from autoprune.inputs.models import call_user, load_factory
from autoprune.inputs.task import CLASSIFICATION, Task, head, sample_shape, to_device

TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
NAMES = ("digits", *TORCHVISION)
VAL_SHARE = 0.15
SCORE_IMAGES = 1000  # validation images that rank candidates: one image is 0.1 points
# Read from the idx files directly: Debian's copies are recompressed, so torchvision's checksums refuse them.
IDX_APT = {"fashion-mnist": "dataset-fashion-mnist"}  # Debian has no MNIST package
IDX_SYSTEM = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # labels (N,), images (N, rows, cols); uint8 data


@dataclass
class Data:
    """Train, validation and test splits, the task they are judged by, and what a model needs to know.

    ``loaders`` holds the user's own DataLoaders, where they gave them: their batch
    size, ``collate_fn`` and sampler are kept as built. ``num_classes`` is None where the
    task has no classes to count (a regression) or the model factory needs none.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int | None
    input_shape: tuple[int, ...]
    task: Task = CLASSIFICATION
    loaders: dict[str, DataLoader] = field(default_factory=dict)

    def example_input(self, batch: int = 1) -> Any:
        """What the model is called with, for ``batch`` samples of the validation data (``task.inputs``):
        the dependency graph, thop and the export count at the data's own shape."""
        return head(self._example, batch)

    @cached_property
    def _example(self) -> Any:
        return to_device(self.task.inputs(next(iter(self.loader("val", 8)))), torch.device("cpu"))

    @cached_property
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
        """Batches of ``train``, ``val``, ``test`` or ``score`` (see :attr:`score`).

        A split the user gave as a DataLoader is that loader; ``score`` then keeps the
        validation loader's batch size and ``collate_fn``.
        """
        if split in self.loaders:
            return self.loaders[split]
        dataset = getattr(self, split)
        collate = self.task.collate_fn
        if split == "score" and "val" in self.loaders:
            batch_size, collate = self.loaders["val"].batch_size or batch_size, self.loaders["val"].collate_fn
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=shuffle and len(dataset) > batch_size, collate_fn=collate)

    def with_task(self, task: Task) -> Data:
        """These splits judged by ``task`` (the example input is taken afresh)."""
        return replace(self, task=task)


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

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.25] * 3)])
    cls = getattr(datasets, TORCHVISION[name])
    try:
        full = cls(str(data_dir), train=True, download=download, transform=transform)
        test = cls(str(data_dir), train=False, download=download, transform=transform)
    except RuntimeError as err:
        raise AutopruneError(f"{name} is not in {data_dir} ({err}); pass --download to fetch it "
                             "or --data-dir to where it is") from None
    except OSError as err:  # URLError included: --download with no network
        raise AutopruneError(f"could not download {name} into {data_dir} ({getattr(err, 'reason', err)}); "
                             "download it where there is a network and pass --data-dir to it") from None
    train, val = _split(full, 0.1, seed)
    return Data(name, train, val, test, len(full.classes), (3, 32, 32))


class GrayImages(Dataset):
    """Decoded gray images kept once as (N, 1, H, W) float32 and seen as three channels.

    ``expand`` makes the three channels a view, so memory is a third of a 3-channel copy.

    Example:
        >>> ds = GrayImages(torch.zeros(4, 1, 32, 32), torch.arange(4))
        >>> ds[1][0].shape, int(ds[1][1]), len(ds)
        (torch.Size([3, 32, 32]), 1, 4)
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].expand(3, -1, -1), self.targets[index]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (``.gz`` or not) as a uint8 array, its magic number and size checked.

    Example:
        >>> read_idx(Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"), 1).shape
        (10000,)
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip's errors included: bad header, truncated stream
        raise AutopruneError(f"{path} cannot be read ({err}); delete it and pass --download, "
                             "or point --data-dir at an intact copy") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != IDX_MAGIC[ndim] or len(raw) < header:
        found = "a short file" if magic is None else f"magic 0x{magic:08x}"
        raise AutopruneError(f"{path} is not an idx{ndim} file ({found}, expected 0x{IDX_MAGIC[ndim]:08x}); "
                             "delete it and pass --download, or point --data-dir at an intact copy")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if len(raw) != header + math.prod(dims):
        raise AutopruneError(f"{path} holds {len(raw) - header} bytes of data but its header says "
                             f"{'×'.join(map(str, dims))}; delete it and pass --download, or point --data-dir "
                             "at an intact copy")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_paths(name: str, data_dir: Path) -> dict[str, Path] | None:
    """The four idx files of the first folder holding all of them (plain preferred to ``.gz``)."""
    folders = [data_dir, data_dir / TORCHVISION[name] / "raw"]
    folders += [IDX_SYSTEM[name]] if name in IDX_SYSTEM else []
    for folder in folders:
        found = {}
        for stem in IDX_FILES:
            found[stem] = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
        if all(found.values()):
            return found
    return None


def _download_idx(name: str, data_dir: Path) -> None:
    from torchvision import datasets

    try:  # fetches all four files into data_dir/<Name>/raw/, then reads the small test split
        getattr(datasets, TORCHVISION[name])(str(data_dir), train=False, download=True)
    except (RuntimeError, OSError) as err:
        raise AutopruneError(f"could not download {name} into {data_dir} ({err}); fetch its idx files "
                             "by hand and pass --data-dir to where they are") from None


def _gray_images(images: np.ndarray, size: int = 32, chunk: int = 10000) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, size, size), resized bilinearly once.

    Chunked so the float copies at 28×28 stay small; mean 0.5, std 0.25 of [0, 1] pixels as
    torchvision's Resize(32) + ToTensor + Normalize gave (within one grey level: PIL rounds).
    """
    out = torch.empty(len(images), 1, size, size)
    for start in range(0, len(images), chunk):
        part = torch.tensor(images[start:start + chunk]).unsqueeze(1).float().div_(255)  # copy: read-only buffer
        part = torch.nn.functional.interpolate(part, size=(size, size), mode="bilinear", align_corners=False)
        out[start:start + chunk] = part.sub_(0.5).div_(0.25)
    return out


def _idx(name: str, data_dir: Path, download: bool, seed: int) -> Data:
    """MNIST or Fashion-MNIST from its idx files: decoded once, no per-image work in an epoch."""
    paths = _idx_paths(name, data_dir)
    if paths is None and download:
        _download_idx(name, data_dir)
        paths = _idx_paths(name, data_dir)
    if paths is None:
        system = f" nor {IDX_SYSTEM[name]}" if name in IDX_SYSTEM else ""
        apt = f"apt-get install {IDX_APT[name]}, " if name in IDX_APT else ""
        raise AutopruneError(f"{name} is not in {data_dir} (flat or {TORCHVISION[name]}/raw/){system}; "
                             f"{apt}pass --data-dir to where its idx files are, or --download to fetch them")
    splits = {}
    for split in ("train", "t10k"):
        images = read_idx(paths[f"{split}-images-idx3-ubyte"], 3)
        labels = read_idx(paths[f"{split}-labels-idx1-ubyte"], 1)
        if len(images) != len(labels):
            raise AutopruneError(f"{paths[f'{split}-images-idx3-ubyte'].parent}: {len(images)} {split} images "
                                 f"but {len(labels)} labels; delete the files and pass --download")
        splits[split] = GrayImages(_gray_images(images), torch.from_numpy(labels.astype(np.int64)))
    train, val = _split(splits["train"], 0.1, seed)
    return Data(name, train, val, splits["t10k"], 10, (3, 32, 32))


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


def _factory(spec: str, task: Task) -> Data:
    made = call_user(load_factory(spec, "data"), spec, "data")
    if not (isinstance(made, (tuple, list)) and len(made) == 3):
        raise AutopruneError(f"data factory {spec} must return (train, val, test) datasets or DataLoaders, "
                             f"not {type(made).__name__}")
    return from_splits(spec, *made, where=f"data factory {spec}", task=task)


SPLITS = ("train", "val", "test")


def from_splits(name: str, train: Dataset | DataLoader, val: Dataset | DataLoader, test: Dataset | DataLoader,
                where: str = "data", task: Task = CLASSIFICATION) -> Data:
    """A :class:`Data` from three datasets or DataLoaders (a loader is kept as built).

    For classification the samples must be (image tensor, class index) pairs and the
    class count is the train set's ``num_classes`` attribute, or the largest label
    seen plus one (read from sets of up to 20,000 images). For another task the
    samples are whatever its ``loss``, ``score`` and ``inputs`` take, and
    ``num_classes`` is the train set's attribute if it has one (for the model factory).

    Example:
        >>> ds = TensorDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 1]))
        >>> from_splits("toy", ds, ds, ds).num_classes
        3
    """
    given = dict(zip(SPLITS, (train, val, test)))
    loaders = {split: d for split, d in given.items() if isinstance(d, DataLoader)}
    sets = {split: d.dataset if isinstance(d, DataLoader) else d for split, d in given.items()}
    for split, dataset in sets.items():
        if len(dataset) == 0:
            raise AutopruneError(f"{where}: its {split} set is empty; give every split at least one sample")
    num_classes = getattr(sets["train"], "num_classes", None)
    if task.is_classification:
        for split, dataset in sets.items():
            _check_sample(where, split, dataset)
        labels = {int(sets["train"][i][1]) for i in range(len(sets["train"]))} if len(sets["train"]) <= 20000 else set()
        num_classes = num_classes or (max(labels) + 1 if labels else None)
        if num_classes is None:
            raise AutopruneError(f"{where}: give the train set a num_classes attribute")
    data = Data(name, sets["train"], sets["val"], sets["test"], num_classes and int(num_classes), (), task, loaders)
    data.input_shape = sample_shape(example_of(data, where))
    return data


def example_of(data: Data, where: str = "the data") -> Any:
    """The data's example input, or one line saying why ``task.inputs`` cannot make one from its batches."""
    try:
        return data.example_input()
    except AutopruneError:
        raise
    except Exception as err:
        raise AutopruneError(f"task {data.task.label} does not fit {where}: taking a validation batch and its "
                             f"inputs(batch) raised {type(err).__name__}: {' '.join(str(err).split())[:200]}; "
                             "give a data set and task that fit each other") from None


def _check_sample(spec: str, name: str, split: Dataset) -> None:
    """A factory's split must hold (image tensor, class index) pairs: say which part is wrong, and how."""
    where = f"{spec}: its {name} set"
    if len(split) == 0:
        raise AutopruneError(f"{where} is empty; give every split at least one (image, label) pair")
    item = split[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise AutopruneError(f"{where} must give (image, label) pairs, not {type(item).__name__}")
    image, label = item
    if not isinstance(image, torch.Tensor):
        raise AutopruneError(f"{where} gives images as {type(image).__name__}; make them tensors "
                             "(e.g. transforms.ToTensor())")
    try:
        index = torch.as_tensor(label)
    except (TypeError, ValueError, RuntimeError):
        index = None
    if index is None or index.numel() != 1 or index.is_floating_point() or index.is_complex():
        found = f"shape {tuple(index.shape)} and type {index.dtype}" if index is not None else type(label).__name__
        raise AutopruneError(f"{where} gives labels of {found}; give one class index per image "
                             "(an int; for one-hot labels, their argmax)")


def load_data(spec: str, data_dir: str | Path = "data", download: bool = False,
              seed: int = 0, image_size: int = 64, task: Task = CLASSIFICATION) -> Data:
    """Resolve ``--dataset``: a known name, an image-folder path, or ``file.py:factory``.

    ``mnist`` and ``fashion-mnist`` are read offline from their idx files in ``data_dir``
    (flat or torchvision's ``<Name>/raw/``) or Debian's ``dataset-fashion-mnist`` folder.

    Example:
        >>> data = load_data("digits")
        >>> data.num_classes, data.input_shape
        (10, (3, 32, 32))
    """
    key = spec.lower()
    if ":" in spec and not Path(spec).is_dir():
        return _factory(spec, task)
    if key == "digits":
        data = digits(seed)
    elif key in ("mnist", "fashion-mnist"):
        data = _idx(key, Path(data_dir), download, seed)
    elif key in TORCHVISION:
        data = _torchvision(key, Path(data_dir), download, seed)
    elif Path(spec).is_dir():
        data = _image_folder(Path(spec), image_size, seed)
    else:
        raise AutopruneError(f"unknown data set {spec!r}; use one of {', '.join(NAMES)}, an image folder, "
                         "or path/to/file.py:factory returning (train, val, test)")
    return data if task.is_classification else data.with_task(task)

