"""Resolve ``--model`` and ``--weights`` into an ``nn.Module``.

A model is a torchvision classification name (``resnet18``), an importable
``package.module:factory``, or ``path/to/file.py:factory``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from autoprune.errors import AutopruneError, one_line, why
# user_object: model.pt files saved before the subpackages name it here (autoprune.inputs.models.user_object).
from autoprune.files import USER_MODULES, ByValue, user_object  # noqa: F401

EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_factory(spec: str, what: str = "model") -> Callable[..., Any]:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    factory = load_attribute(spec, what, missing="callable ")
    if not callable(factory):
        source, _, name = spec.rpartition(":")
        raise AutopruneError(f"{source} has no callable {name!r}; name a function that builds the {what}")
    return factory


def load_attribute(spec: str, what: str = "model", missing: str = "") -> Any:
    """``package.module:name`` or ``path/to/file.py:name`` -> that name's value in the module."""
    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise AutopruneError(f"{what} factory {spec!r} must look like package.module:factory "
                             "or path/to/file.py:factory")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise AutopruneError(f"{what} file {path} does not exist")
        module_name = f"_autoprune_user_{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # so pickled models can find their classes
        try:
            source = importlib.util.decode_source(path.read_bytes())  # read once: what runs is what is saved
            USER_MODULES[module_name] = source
            exec(compile(source, str(path), "exec"), module.__dict__)
        except Exception as err:  # the user's code: a syntax error or anything it raises
            del sys.modules[module_name]
            USER_MODULES.pop(module_name, None)  # not there where the file could not be read
            raise AutopruneError(f"cannot import {path} for {what} {spec!r}: {why(err)}") from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as err:
            raise AutopruneError(f"cannot import {source!r} for {what} {spec!r}: {why(err)}") from None
    if not hasattr(module, name):
        raise AutopruneError(f"{source} has no {missing}{name!r}; name a function that builds the {what}")
    return getattr(module, name)


def absolute_spec(spec: str) -> str:
    """``path/to/file.py:factory`` with the file's absolute path, so it is found from any folder;
    any other spec as it is."""
    source, _, name = spec.rpartition(":")
    return f"{Path(source).resolve()}:{name}" if source.endswith(".py") else spec


def call_user(factory: Callable[..., Any], spec: str, what: str, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``, where whatever the user's code raises becomes one line naming ``spec``."""
    try:
        return factory(*args, **kwargs)
    except AutopruneError:  # already one line (e.g. a data factory whose files are missing)
        raise
    except Exception as err:  # the user's code: anything it raises is theirs to fix
        raise AutopruneError(f"{what} factory {spec} raised {why(err)}; fix the factory or name another") from None


def _call_factory(factory: Callable[..., nn.Module], spec: str, num_classes: int | None) -> nn.Module:
    try:
        accepts = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts = False
    given = {"num_classes": num_classes} if accepts and num_classes is not None else {}
    return call_user(factory, spec, "model", **given)


class _Probe(ByValue):
    """Pickles a model's structure to nowhere, tensors left out: can ``model.pt`` hold it?"""

    def persistent_id(self, obj: Any) -> Any:
        return id(obj) if isinstance(obj, (torch.Tensor, torch.UntypedStorage)) else None


def check_picklable(model: nn.Module, name: str) -> None:
    """Refuse, before any training, a model ``model.pt`` cannot hold (a class made inside a function)."""
    sink = types.SimpleNamespace(write=len)
    try:
        _Probe(sink, protocol=2).dump(model)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise AutopruneError(f"model {name} cannot be saved as model.pt ({one_line(err)}); define its classes "
                             "and functions at the top level of their file, not inside a function") from None


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap a pretrained 1000-class head for one with ``num_classes`` outputs."""
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear) and module.out_features != num_classes:
            new = nn.Linear(module.in_features, num_classes, bias=module.bias is not None)
        elif isinstance(module, nn.Conv2d) and module.out_channels != num_classes:
            new = nn.Conv2d(module.in_channels, num_classes, module.kernel_size, module.stride)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        return


def mlp(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28),
        hidden: tuple[int, ...] = (512, 256)) -> nn.Sequential:
    """The classic pruning testbed: Linear–BatchNorm1d–LeakyReLU blocks, 784-512-256-10 on MNIST.

    The input width is the product of ``input_shape`` (3072 on the 3×32×32 digits).

    Example:
        >>> mlp(10, (1, 28, 28))[1].in_features
        784
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.LeakyReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


BUILTIN = {"mlp": mlp}


def build_model(spec: str, num_classes: int | None, pretrained: bool = False,
                input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Build the base model for ``num_classes`` classes (weights random unless ``pretrained``).

    ``input_shape`` (channels, height, width) sizes built-in models such as ``mlp``.

    Example:
        >>> build_model("resnet18", num_classes=10).fc.out_features
        10
    """
    if spec in BUILTIN:
        if pretrained:
            raise AutopruneError(f"built-in model {spec!r} has no pretrained weights; leave out --weights DEFAULT")
        return BUILTIN[spec](num_classes or 10, tuple(input_shape or (1, 28, 28)))
    if ":" in spec:
        model = _call_factory(load_factory(spec, "model"), spec, num_classes)
        if not isinstance(model, nn.Module):
            raise AutopruneError(f"model factory {spec} returned {type(model).__name__}, not an nn.Module")
        return model
    names = torchvision_names()
    if spec not in names:
        raise AutopruneError(f"unknown model {spec!r}; use mlp, a torchvision classification model "
                             f"(e.g. {', '.join(n for n in names if n in ('resnet18', 'mobilenet_v2', 'vgg11_bn'))}), "
                             "package.module:factory or path/to/file.py:factory")
    import torchvision

    extra = EXTRA_KWARGS.get(spec, {})
    if pretrained:
        model = _pretrained(spec)
        if num_classes != 1000:
            _replace_head(model, num_classes)
        return model
    sized = {"num_classes": num_classes} if num_classes else {}  # a task without classes: the model's own head
    return torchvision.models.get_model(spec, **sized, **extra)


def _pretrained(spec: str) -> nn.Module:
    """torchvision's DEFAULT weights, fetched once into torch hub's cache (``$TORCH_HOME``)."""
    import torch.hub
    import torchvision

    url = torchvision.models.get_model_weights(spec).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cached.is_file():  # fetched here, quietly, so that a failure is one line naming the file
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except OSError as err:  # URLError included: no network
            raise AutopruneError(f"could not download {spec}'s DEFAULT weights ({getattr(err, 'reason', err)}); "
                                 f"with no network, put {url} at {cached}, or pass --weights a state_dict "
                                 "file") from None
    return torchvision.models.get_model(spec, weights="DEFAULT")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a state dict file, or a checkpoint holding one under ``state_dict``/``model``."""
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(f"weights file {path} does not exist; pass a saved state_dict "
                             "or leave out --weights to train the base model")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise AutopruneError(f"cannot read weights from {path} ({type(err).__name__}); save "
                             "model.state_dict() with torch.save") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise AutopruneError(f"{path} holds no state dict; save model.state_dict() with torch.save")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model``, refusing weights that do not fit it."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", shapes)) if keys)
        raise AutopruneError(f"weights in {path} do not fit the model ({detail}); "
                             "pass the weights saved from this model and number of classes")
    model.load_state_dict(state)
    return model
