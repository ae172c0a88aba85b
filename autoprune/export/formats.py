"""Deployment copies of a pruned model: ONNX, TorchScript, int8, and their CPU latency (:func:`deploy`).

Each file is checked against the PyTorch model it came from (same inputs, the
largest output difference recorded); a copy that disagrees is an error, not a file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from autoprune.cost.budget import Budget
from autoprune.cost.latency import LatencySettings, check_budget
from autoprune.cost.timing import latency_ms
from autoprune.errors import AutopruneError
from autoprune.files import atomic_path, save_torch
from autoprune.inputs.data import Data
from autoprune.options import FORMATS, ExportOptions
from autoprune.train.loop import evaluate

__all__ = ["FORMATS", "deploy", "quantize_dynamic", "quantized_layers", "state_dict_bytes", "to_onnx",
           "to_torchscript", "write_formats", "write_int8"]
# float32 through another runtime: differences of ~1e-6 are normal, 1e-3 of the output scale is not.
RELATIVE_TOLERANCE = 1e-3


def _check(name: str, got: Sequence[np.ndarray], want: Any) -> float:
    """The largest difference between a copy's outputs and the model's (a dict or list of tensors flattened)."""
    wanted = [t.detach().cpu().numpy() for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(got) != len(wanted) or any(g.shape != w.shape for g, w in zip(got, wanted)):
        raise AutopruneError(f"the {name} copy does not reproduce the PyTorch model (outputs "
                             f"{[g.shape for g in got]} vs {[w.shape for w in wanted]}); does the model branch "
                             "on its input data?")
    diff = max(float(np.abs(g - w).max()) if w.size else 0.0 for g, w in zip(got, wanted))
    scale = max(1.0, *(float(np.abs(w).max()) for w in wanted if w.size))
    if diff > RELATIVE_TOLERANCE * scale:
        raise AutopruneError(f"the {name} copy does not reproduce the PyTorch model (largest difference "
                             f"{diff:.3g}); does the model branch on its input data?")
    return diff


def to_onnx(model: nn.Module, inputs: torch.Tensor, path: Path) -> dict[str, Any]:
    """Write ``model`` as ONNX (dynamic batch) and check it through onnxruntime on ``inputs``."""
    try:
        import onnxruntime
    except ImportError:
        raise AutopruneError("--format onnx needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    if not isinstance(inputs, torch.Tensor):
        raise AutopruneError("torch.onnx exports a model called with one batched tensor; this one takes "
                             f"{type(inputs).__name__} (a detector's list of images?): use model.pt")
    model = model.cpu().eval()
    batch = torch.export.Dim("batch")
    with torch.inference_mode():
        want = model(inputs)
    names = {"output_names": ["logits"]} if isinstance(want, torch.Tensor) else {}
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (inputs[:2],), str(tmp), input_names=["input"], **names,
                              dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                              external_data=False)  # one self-contained file (ONNX caps that at 2 GB)
    except Exception as err:  # the exporter cannot capture this model: say so on one line
        raise AutopruneError(f"torch.onnx could not export the model ({type(err).__name__}; "
                             "data-dependent control flow?); try --format torchscript") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": inputs.numpy()})
    return {"file": path.name, "bytes": path.stat().st_size, "max_abs_diff": _check("ONNX", got, want),
            "checked_batch": len(inputs)}


def to_torchscript(model: nn.Module, inputs: torch.Tensor, path: Path) -> dict[str, Any]:
    """Write ``model`` traced as TorchScript and check the reloaded file on ``inputs``."""
    model = model.cpu().eval()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the portable C++ format
        try:
            traced = torch.jit.trace(model, inputs[:2], strict=False)
        except Exception as err:  # tracing cannot follow this model: say so on one line
            raise AutopruneError(f"torch.jit.trace could not trace the model ({type(err).__name__}); "
                                 "try --format onnx") from None
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
        got = [t.numpy() for t in tree_leaves(torch.jit.load(str(path))(inputs)) if isinstance(t, torch.Tensor)]
        want = model(inputs)
    return {"file": path.name, "bytes": path.stat().st_size, "max_abs_diff": _check("TorchScript", got, want),
            "checked_batch": len(inputs)}


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """An int8 copy with dynamically quantized weights (Linear, LSTM, GRU, RNN cells).

    PyTorch quantizes these layers' weights to int8 ahead of time and their
    activations on the fly; convolutions have no dynamic int8 kernel and stay float.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantization is deprecated upstream, still shipped
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), {nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell},
            dtype=torch.qint8)


def quantized_layers(model: nn.Module) -> int:
    """How many modules of ``model`` run int8 kernels."""
    return sum(1 for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"))


def state_dict_bytes(model: nn.Module, path: Path) -> int:
    """Save ``model``'s state dict to ``path``; its size on disk."""
    save_torch(model.state_dict(), path)
    return path.stat().st_size


def write_formats(pruned: nn.Module, inputs: Any, out: Path, formats: Sequence[str]) -> dict[str, Any]:
    """Write ``pruned`` in each of ``formats`` into ``out``, each checked on ``inputs``: per format its file
    entry, or an ``error`` entry where the model cannot take that format (said on one line; model.pt stands)."""
    written: dict[str, Any] = {}
    for name in formats:
        path = out / ("model.onnx" if name == "onnx" else "model.torchscript.pt")
        write = to_onnx if name == "onnx" else to_torchscript
        try:
            written[name] = write(pruned, inputs, path)
        except AutopruneError as err:
            written[name] = {"error": str(err)}
            print(f"autoprune: {name}: {err}", file=sys.stderr)
    return written


def write_int8(quantized: nn.Module, out: Path, data: Data) -> dict[str, Any]:
    """Write the int8 copy and measure its size and accuracy beside the float model's."""
    cpu = torch.device("cpu")
    save_torch(quantized, out / "model-int8.pt")
    return {"method": "dynamic int8 (torch.ao.quantization.quantize_dynamic)", "file": "model-int8.pt",
            "quantized_layers": quantized_layers(quantized),
            "state_dict_bytes": state_dict_bytes(quantized, out / "weights-int8.pt"),
            "float_state_dict_bytes": (out / "weights.pt").stat().st_size,
            "val_accuracy": evaluate(quantized, data.loader("val", 256), cpu, data.task),
            "test_accuracy": evaluate(quantized, data.loader("test", 256), cpu, data.task)}


def deploy(base: nn.Module, pruned: nn.Module, data: Data, out: Path, options: ExportOptions,
           config: Mapping[str, Any]) -> dict[str, Any]:
    """What an export writes into ``out`` beside ``model.pt``, as its summary's entries: the copies in
    ``options.formats``, an int8 copy with ``options.quantize``, the re-timing a latency budget asks
    for (``config``: the study's) and the CPU latency of the base, pruned (and int8) models."""
    inputs = data.example_input(16)
    found = write_formats(pruned, inputs, out, options.formats)
    models = {"base": base, "pruned": pruned}
    if options.quantize:
        models["quantized"] = quantize_dynamic(pruned)
        found["quantized"] = write_int8(models["quantized"], out, data)
    latency = latency_ms(models, data.input_shape, options.latency_batches, options.repeats, threads=options.threads,
                         listed=isinstance(inputs, list))
    if "latency_backend" in config:  # a latency budget: re-timed afresh with the study's own settings
        found["latency_check"] = check_budget(base, pruned, Budget.parse(config["budget"]),
                                              LatencySettings.from_config(config))
    return {**found, "out": str(out), "latency_ms": latency, "latency_threads": options.threads,
            "latency_repeats": options.repeats}
