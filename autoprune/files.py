"""Atomic file writes and the provenance every output records."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import platform
import re
import sys
import tempfile
import types
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from autoprune.errors import AutopruneError, why

if TYPE_CHECKING:
    import pandas as pd

USER_MODULES: dict[str, str] = {}  # modules made from the user's files (_autoprune_user_*): name -> source
PACKAGES = ("autoprune", "torch", "torchvision", "torch-pruning", "optuna", "thop", "pandas")


def append_rows(path: str | Path, frame: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """``frame`` with ``rows`` added, written to the CSV at ``path`` atomically: a benchmark that is
    killed keeps every row it measured before."""
    import pandas  # here, not at the top: every command imports this module, few write tables

    new = pandas.DataFrame(rows)
    frame = pandas.concat([frame, new], ignore_index=True) if len(frame) else new
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    A run killed while writing leaves the old file (or none), never half a file;
    the temporary file it leaves (``.NAME.PID.XXXX.tmp``) is removed by :func:`sweep`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sweep(folder: str | Path) -> list[Path]:
    """Delete temporary files that killed processes left in ``folder``; returns them.

    A file whose writer still runs (same host) is kept.

    Example:
        >>> sweep("results/resnet18-digits-flops0.3")
        []
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.split(".")[-3]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write strict JSON: infinities and NaNs (an uncapped budget) become null."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    text = json.dumps(clean(data), indent=2, allow_nan=False)
    # Lists of numbers (channel indices, shapes) on one line each: readable, and a tenth the size.
    text = _NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    write_text(path, text + "\n")


_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.e+-]+,\s*)*-?[\d.e+-]+)\s*\]")


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save``, with the classes of the user's model files saved by value: the file loads in a
    fresh process, from any folder, as long as autoprune is installed."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp, pickle_module=PICKLE_BY_VALUE)


def versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour shapes the numbers."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of a model's weights: the base-model identity plans refer to."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ByValue(pickle.Pickler):
    """Pickles the classes and functions of the user's files by their file's source: the module name they
    have (_autoprune_user_*) exists only in the process that imported the file."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and obj.__module__ in USER_MODULES \
                and "<locals>" not in obj.__qualname__:  # a class made inside a function has no name to find
            return user_object, (obj.__module__, USER_MODULES[obj.__module__], obj.__qualname__)
        return NotImplemented


PICKLE_BY_VALUE = types.SimpleNamespace(__name__="autoprune.files", Pickler=ByValue)  # torch.save(pickle_module=)


def user_object(module: str, source: str, qualname: str) -> Any:
    """Unpickles what :class:`ByValue` pickled: ``qualname`` of the user's file, whose module is made
    from ``source`` once per process (under another name where one of that name holds other source)."""
    name = module if USER_MODULES.get(module, source) == source else \
        f"{module}_{hashlib.sha1(source.encode()).hexdigest()[:8]}"
    made = sys.modules.get(name) if USER_MODULES.get(name) == source else None
    if made is None:
        made = sys.modules[name] = types.ModuleType(name)
        USER_MODULES[name] = source
        try:
            exec(compile(source, f"<{module}, as saved with the model>", "exec"), made.__dict__)
        except Exception as err:
            del sys.modules[name], USER_MODULES[name]
            raise AutopruneError(f"cannot remake {qualname} from the source saved with the model: {why(err)}; "
                                 "rebuild the model with autoprune.load_pruned") from None
    found: Any = made
    for part in qualname.split("."):
        found = getattr(found, part)
    return found
