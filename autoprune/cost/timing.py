"""CPU wall time of models: taking turns, on one thread, in PyTorch or onnxruntime.

Used by the latency budget (:mod:`autoprune.cost.latency`) and by export's latency
table; one place, so both time models the same way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from autoprune.errors import AutopruneError


@torch.inference_mode()
def latency_ms(models: dict[str, nn.Module], shape: Sequence[int], batches: Sequence[int] = (1, 32),
               repeats: int = 30, warmup: int = 3, threads: int = 1,
               listed: bool = False) -> dict[str, dict[str, float]]:
    """Median CPU wall time of one forward pass on random inputs of one sample's ``shape``, in
    milliseconds, per model and batch size.

    The models take turns within each repeat (:func:`interleaved`); ``listed`` models take a list
    of images (a detector). ``threads``
    intra-op threads (default 1): with more, a core taken by another process
    stalls every parallel region, and times on a shared machine jump a hundredfold.

    Example:
        >>> latency_ms({"a": nn.Linear(4, 2)}, (4,), batches=(1, 8), repeats=5)["a"].keys()
        dict_keys(['1', '8'])
    """
    models = {name: model.cpu().eval() for name, model in models.items()}
    found: dict[str, dict[str, float]] = {name: {} for name in models}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in batches:
            _time_batch(models, shape, batch, repeats, warmup, found, listed)
    finally:
        torch.set_num_threads(before)
    return found


@torch.inference_mode()
def _time_batch(models: dict[str, nn.Module], shape: Sequence[int], batch: int, repeats: int, warmup: int,
                found: dict[str, dict[str, float]], listed: bool = False) -> None:
    """Time every model at one batch size (random inputs, fixed seed) into ``found``."""
    inputs = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    inputs = list(inputs) if listed else inputs
    times = interleaved({name: (lambda m=model: m(inputs)) for name, model in models.items()}, repeats, warmup)
    for name in models:
        found[name][str(batch)] = round(statistics.median(times[name]), 3)


def interleaved(runners: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Wall time of each runner, in milliseconds, ``repeats`` times, the runners taking turns.

    Taking turns within each repeat means a machine that gets busier part-way
    slows every runner alike, so ratios between them stay fair.

    Example:
        >>> len(interleaved({"noop": lambda: None}, repeats=5)["noop"])
        5
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def onnx_runner(model: nn.Module, inputs: torch.Tensor, threads: int = 1) -> Callable[[], object]:
    """One forward pass of ``model`` through onnxruntime's CPU execution provider, as a callable.

    The model is exported in memory with the TorchScript-based exporter (a
    fraction of a second; the dynamo exporter :func:`to_onnx` uses takes seconds),
    so it can time every candidate of a search. ``threads`` intra-op threads.

    Example:
        >>> onnx_runner(nn.Linear(4, 2), torch.zeros(1, 4))()
    """
    try:
        import onnxruntime
    except ImportError:
        raise AutopruneError("--latency-backend onnxruntime needs onnx and onnxruntime: "
                             "pip install onnx onnxruntime") from None
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), (inputs.cpu(),), buffer, input_names=["input"],
                          dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"input": inputs.cpu().numpy()}
    return lambda: session.run(None, feed)
