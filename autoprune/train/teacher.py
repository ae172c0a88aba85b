"""The teacher's outputs on the training set, computed once and looked up by sample index.

Distillation with a live teacher runs the base model forward in every fine-tune step
(resnet18 on one CPU thread, the student at a quarter of its FLOPs: 1.8× the step time).
The base model does not change during a search, and without random augmentation neither
does a training sample, so its outputs are computed once per run, stored in the run folder
(:data:`TEACHER_OUTPUTS`) and read back by every trial's fine-tune and the final one.

The training step needs each batch's sample indices: :func:`with_indices` makes a
loader that yields ``(indices, batch)`` with the same batches in the same order as the
loader it is given (it shares that loader's batch sampler and random generator), so
shuffling and seeds are as they are without distillation.

The file is keyed by the base model's weights (their fingerprint), the data (its name,
size, task and a hash of a few samples) and this format: another base or other data
never reuses it, a resumed run does. It is written atomically: a killed run leaves the
old file or none.

**Random augmentation.** Where reading a training sample twice gives two different
samples, the cached output would be the teacher's answer for another view than the
one the student is trained on. Distillation works best with teacher and student on
the same view (Beyer et al., 2022, "Knowledge distillation: A good teacher is
patient and consistent"), so then nothing is cached: the teacher runs live in every
step, as before, and one line says why. The same holds for data that cannot be
indexed (an iterable dataset), outputs that are not batch-first tensors (a
detector's per-image dicts) and outputs too large to keep (:data:`MAX_BYTES`).

**Precision.** A classifier's logits are stored in float16 (half the memory; the
distillation loss moves by at most 6e-5 relative, see ``docs/beyond-channels.md``);
a task's own outputs in float32, as its own loss may need the precision.
"""

from __future__ import annotations

import hashlib
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from autoprune.files import fingerprint, save_torch
from autoprune.inputs.data import Data

TEACHER_OUTPUTS = "teacher_outputs.pt"  # in the run folder
FORMAT = 1  # bumped when what is stored changes: an older file is then computed afresh
PROBES = 8  # training samples read twice (augmentation) and hashed (the data's identity)
MAX_BYTES = 2 << 30  # outputs larger than this (a segmenter's full-size maps) are not kept: the teacher runs live
BATCH = 256  # samples per teacher pass while computing


@dataclass(eq=False)
class TeacherOutputs:
    """The teacher's outputs on every sample of ``dataset``, first dimension the sample index.

    ``outputs`` is a tensor or a dict/list/tuple of them (the model's output structure);
    ``dataset`` is the one the indices refer to (not stored: a loader over another
    dataset is served by the live teacher). ``seconds`` is what computing them took.

    Example:
        >>> outputs = teacher_outputs(base, data, out / TEACHER_OUTPUTS, torch.device("cpu"))
        >>> train(pruned, data.loader("train", 64, shuffle=True), 1, device, distill=Distill(base, outputs=outputs))
    """

    outputs: Any
    dataset: Dataset = field(repr=False)
    key: str = ""
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(_leaves(self.outputs)[0])

    def serves(self, loader: DataLoader) -> bool:
        """Whether ``loader``'s batches can be looked up here: same dataset, and batches of sample indices."""
        return loader.dataset is self.dataset and loader.batch_sampler is not None

    def lookup(self, indices: torch.Tensor, device: torch.device) -> Any:
        """The stored outputs of samples ``indices``, on ``device``, float16 read back as float32."""
        def pick(leaf: torch.Tensor) -> torch.Tensor:
            found = leaf[indices].to(device, non_blocking=True)
            return found.float() if found.dtype == torch.float16 else found
        return _tree_map(pick, self.outputs)


class Indexed(Dataset):
    """``dataset`` whose samples come with their index: ``(index, sample)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """Collates ``(index, sample)`` pairs into ``(indices, collate(samples))``."""

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
        return torch.tensor([i for i, _ in pairs]), self.collate([sample for _, sample in pairs])


def with_indices(loader: DataLoader) -> DataLoader:
    """A loader yielding ``(indices, batch)``: ``loader``'s batches, in its order, with their sample indices.

    It shares ``loader``'s batch sampler and generator, so it shuffles exactly as
    ``loader`` would have (use one or the other, not both: they draw from the same generator).

    Example:
        >>> indexed = with_indices(data.loader("train", 64, shuffle=True, seed=3))
        >>> indices, (images, labels) = next(iter(indexed))
    """
    workers = loader.num_workers
    return DataLoader(Indexed(loader.dataset), batch_sampler=loader.batch_sampler,
                      collate_fn=IndexedCollate(loader.collate_fn), num_workers=workers,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context if workers else None,
                      generator=loader.generator, persistent_workers=loader.persistent_workers and workers > 0,
                      **({"prefetch_factor": loader.prefetch_factor} if workers else {}))


def teacher_outputs(teacher: nn.Module, data: Data, path: str | Path, device: torch.device,
                    base_id: str | None = None, quiet: bool = False) -> TeacherOutputs | None:
    """The teacher's outputs on ``data``'s training set: read from ``path`` if it holds them for this
    teacher and data, else computed once and written there (atomically).

    None, with one printed line saying why, where they cannot stand for the live teacher:
    random augmentation (a sample read twice differs), a dataset without indices, outputs
    that are not batch-first tensors, or more than :data:`MAX_BYTES` of them. Every random
    generator is left as it was found, so a run draws the same numbers with or without the cache.
    ``base_id`` is the fingerprint of ``teacher``'s weights (computed when not given).
    """
    dataset, path = data.train, Path(path)
    why = uncached(data)
    if why:
        return _live(why, quiet)
    with _rng_kept():
        first = [dataset[i] for i in _probe_indices(len(dataset))]
        key = _key(base_id or fingerprint(teacher.state_dict()), data, first)
        found = _read(path, key, dataset)
        if found is not None:
            return found
        clock = time.perf_counter()
        try:
            outputs = _compute(teacher, data, device)
        except _Uncacheable as err:
            return _live(str(err), quiet)
        seconds = time.perf_counter() - clock
    save_torch({"format": FORMAT, "key": key, "seconds": seconds, "outputs": outputs}, path)
    if not quiet:
        print(f"distillation: the teacher's outputs on {len(dataset)} training samples computed once "
              f"({seconds:.1f}s) into {path}")
    return TeacherOutputs(outputs, dataset, key, seconds)


def uncached(data: Data) -> str | None:
    """Why the teacher's outputs on ``data``'s training set cannot be computed once and looked up, as far
    as can be told before the teacher runs (None: they can): a dataset without indices, random
    augmentation (a sample read twice differs), a classifier's logits over :data:`MAX_BYTES`. Every
    random generator is left as it was found.

    Example:
        >>> uncached(digits())  # no augmentation, a few MB of logits
    """
    dataset = data.train
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        return "the training data cannot be indexed (an iterable dataset)"
    with _rng_kept():
        if not all(_same(dataset[i], dataset[i]) for i in _probe_indices(len(dataset))):
            return ("reading a training sample twice gave two different samples (random augmentation?), "
                    "so outputs computed once would not match what the student sees")
    if data.task.is_classification and data.num_classes:
        return _too_large(len(dataset) * data.num_classes * 2)  # float16 logits
    return None


def _too_large(total: int) -> str | None:
    """Why ``total`` bytes of outputs are not kept (None: they fit)."""
    if total > MAX_BYTES:
        return f"they would take {total / 2**30:.1f} GiB (more than {MAX_BYTES / 2**30:.0f} GiB)"
    return None


class _Uncacheable(Exception):
    """The teacher's outputs cannot be stored by sample (the message says why)."""


def _live(why: str, quiet: bool) -> None:
    if not quiet:
        print(f"distillation: the teacher runs live in every step: {why}")
    return None


def _read(path: Path, key: str, dataset: Dataset) -> TeacherOutputs | None:
    """The stored outputs if ``path`` holds them under ``key`` (anything else is recomputed)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable (another version's file, a disk error): computed afresh
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or stored.get("format") != FORMAT:
        return None
    found = TeacherOutputs(stored["outputs"], dataset, key, float(stored.get("seconds", 0.0)))
    return found if len(found) == len(dataset) else None


@torch.no_grad()
def _compute(teacher: nn.Module, data: Data, device: torch.device) -> Any:
    """The teacher's outputs on the training set in index order, stacked per output tensor."""
    task, dataset = data.task, data.train
    given = data.loaders.get("train")
    collate = given.collate_fn if given is not None else task.collate_fn
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=False, collate_fn=collate)
    teacher = teacher.to(device).eval()
    parts: list[Any] = []
    for batch in loader:
        output = task.call(teacher, task.to_device(batch, device))
        leaves = _leaves(output)
        size = len(leaves[0]) if isinstance(leaves[0], torch.Tensor) and leaves[0].dim() else None
        if size is None or not all(isinstance(t, torch.Tensor) and t.dim() and len(t) == size for t in leaves):
            raise _Uncacheable("the teacher's outputs are not tensors whose first dimension is the batch's samples")
        if not parts:  # the first batch sets the storage type and says whether it all fits
            half = task.is_classification and all(t.dtype == torch.float32 for t in leaves)
            shape = _tree_map(lambda t: tuple(t.shape[1:]), output)
            total = len(dataset) * sum(t[0].numel() * (2 if half else t.element_size()) for t in leaves)
            if _too_large(total):
                raise _Uncacheable(_too_large(total))
        elif _tree_map(lambda t: tuple(t.shape[1:]), output) != shape:
            raise _Uncacheable("the teacher's outputs change shape from batch to batch")
        parts.append(_tree_map(lambda t: _stored(t, half), output))
    return _stack(parts)


def _stored(tensor: torch.Tensor, half: bool) -> torch.Tensor:
    """``tensor`` on the CPU as stored: in float16 where ``half`` and it fits (else as it is)."""
    tensor = tensor.detach().cpu()
    if half:
        small = tensor.half()
        if torch.isfinite(small).all() or not torch.isfinite(tensor).all():  # beyond float16's range: as it is
            return small
    return tensor


def _stack(parts: list[Any]) -> Any:
    """Per-batch output structures joined into one, each tensor concatenated along samples."""
    head = parts[0]
    if isinstance(head, torch.Tensor):
        dtypes = {p.dtype for p in parts}
        target = torch.float32 if len(dtypes) > 1 else head.dtype  # a batch too large for float16: all float32
        return torch.cat([p.to(target) for p in parts])
    if isinstance(head, dict):
        return {k: _stack([p[k] for p in parts]) for k in head}
    return type(head)(_stack([p[i] for p in parts]) for i in range(len(head)))


def _tree_map(function: Callable, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_map(function, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_tree_map(function, v) for v in tree)
    return function(tree)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


def _probe_indices(n: int) -> list[int]:
    """Up to :data:`PROBES` indices spread evenly over ``n`` samples, the first and last included."""
    return sorted({round(k * (n - 1) / max(1, PROBES - 1)) for k in range(PROBES)}) if n else []


def _same(a: Any, b: Any) -> bool:
    """Whether two samples are equal, tensor for tensor."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # a type whose == is not a truth value: taken as different, the safe side
        return False


def _key(base_id: str, data: Data, samples: list[Any]) -> str:
    """What the outputs depend on: the teacher's weights, the data (name, size, task, a few samples)."""
    digest = hashlib.sha256(f"{FORMAT}|{base_id}|{data.name}|{len(data.train)}|{data.task.label}".encode())
    for sample in samples:
        _hash(sample, digest)
    return digest.hexdigest()[:16]


def _hash(value: Any, digest: Any) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.flatten().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            digest.update(str(k).encode())
            _hash(value[k], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for v in value:
            _hash(v, digest)
    elif isinstance(value, (int, float, str, bool, type(None))):
        digest.update(repr(value).encode())
    else:  # an image object or the like: its bytes where it has them, else only its type
        tobytes = getattr(value, "tobytes", None)
        digest.update(type(value).__name__.encode() + (tobytes() if callable(tobytes) else b""))


@contextmanager
def _rng_kept() -> Iterator[None]:
    """Leave torch's, NumPy's and Python's random generators as they were (reading augmented
    samples and starting a loader draw from them)."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
