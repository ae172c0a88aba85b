"""Latency budgets: a latency table measured on this machine, and every candidate timed end to end.

FLOPs are a poor proxy for speed (depthwise convolutions, odd channel counts,
memory-bound layers), so ``--budget latency=3ms`` caps the latency itself.

- :class:`LatencySettings` says what a latency is: backend (``torch`` eager on
  the search's device, or ``onnxruntime``'s CPU execution provider), batch,
  intra-op threads, device and input shape. A study records them and refuses
  to resume with others.
- :class:`Meter` times whole models: the median of interleaved runs after a
  warm-up, with the base model timed in the same loop, so load that comes and
  goes on a shared machine cancels out (a candidate's latency is its median
  ratio to the base, times the base's latency at the start). It reports the
  spread of the repeats and re-times a candidate that lands within that
  spread of the budget.
- :class:`LatencyModel` predicts a plan's latency without building it, like
  :class:`~autoprune.cost.costmodel.CostModel` does FLOPs: each convolution and
  linear layer of a distinct shape is timed alone over a grid of input and
  output widths and interpolated bilinearly; what the layers do not account
  for (norms, activations, additions, the per-call overhead) is fitted by
  non-negative least squares, weighted for relative error, on a few whole-model
  measurements (the base and random plans rounded as the search rounds). The
  per-layer sum alone misses that remainder, so the fit is what makes it add
  up. The table and the fit are cached in a JSON file keyed by machine, device,
  backend, threads, batch and library versions: a second study on the same
  machine measures nothing but its candidates, and its predictions are scaled
  by its base's latency over the base's latency when the fit was made.

A timer is injectable (:data:`Timer`), so tests run on a deterministic fake.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from autoprune.cost.budget import Budget, keep_counts
from autoprune.cost.costmodel import CostModel
from autoprune.cost.timing import interleaved, onnx_runner
from autoprune.counting import Cost
from autoprune.errors import AutopruneError
from autoprune.files import save_torch, write_json
from autoprune.inputs.task import to_device
from autoprune.prune.groups import ChannelGroups

BACKENDS = ("torch", "onnxruntime")
CACHE_ENV = "AUTOPRUNE_LATENCY_CACHE"  # folder of the latency tables (default ~/.cache/autoprune/latency)
GRID = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)  # widths each layer is timed at, as shares of its full width
TIMED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
REPEATS = 20  # interleaved runs per whole-model timing
LAYER_REPEATS = 7  # per grid point of a layer
CALIBRATION_PLANS = 16  # random plans timed whole to fit what the layers leave out (8 missed on onnxruntime)
FIT_VERSION = 2  # how the remainder is fitted; a cached fit made another way is made again
RETIMES = 2  # more rounds for a candidate within the noise of the budget

# cases (name -> (module, input batch)) and repeats -> milliseconds per repeat, per case.
Timer = Callable[[Mapping[str, tuple[nn.Module, torch.Tensor]], int], dict[str, list[float]]]


@dataclass(frozen=True)
class LatencySettings:
    """What a latency means: backend, batch, intra-op threads, device and input shape (no batch dim).

    Example:
        >>> LatencySettings("onnxruntime", batch=32).config()["latency_backend"]
        'onnxruntime'
    """

    backend: str = "torch"
    batch: int = 1
    threads: int = 1
    device: str = "cpu"
    input_shape: tuple[int, ...] = (3, 32, 32)
    listed: bool = False  # the model takes a list of images (a detector), not a batched tensor

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise AutopruneError(f"unknown --latency-backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        for flag, value in (("--latency-batch", self.batch), ("--latency-threads", self.threads)):
            if not isinstance(value, int) or value < 1:
                raise AutopruneError(f"{flag} must be a whole number of at least 1, not {value}")
        if self.backend == "onnxruntime":  # the CPU execution provider, whatever device trains
            object.__setattr__(self, "device", "cpu")
            if self.listed:
                raise AutopruneError("--latency-backend onnxruntime times a model called with one batched tensor; "
                                     "this one takes a list of images: use --latency-backend torch")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    def config(self) -> dict[str, Any]:
        """The settings as a study records them (a resume with other ones is refused)."""
        return {"latency_backend": self.backend, "latency_batch": self.batch, "latency_threads": self.threads,
                "latency_device": self.device, "latency_input_shape": list(self.input_shape),
                **({"latency_input_list": True} if self.listed else {})}  # absent: older studies resume

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LatencySettings:
        return cls(config["latency_backend"], int(config["latency_batch"]), int(config["latency_threads"]),
                   config["latency_device"], tuple(config["latency_input_shape"]),
                   bool(config.get("latency_input_list")))

    def inputs(self, shape: tuple[int, ...] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """A fixed random batch of ``shape`` (default: the model's input, as a list where it takes one)."""
        batch = torch.randn(self.batch, *(shape or self.input_shape), generator=torch.Generator().manual_seed(0))
        return list(batch) if self.listed and shape is None else batch

    def cache_key(self) -> str:
        """What a latency table depends on: the machine, device, backend, threads, batch, versions."""
        parts = {"machine": _machine(self.device), "backend": self.backend, "threads": self.threads,
                 "batch": self.batch, "torch": torch.__version__}
        if self.backend == "onnxruntime":
            import onnxruntime
            parts["onnxruntime"] = onnxruntime.__version__
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _machine(device: str) -> str:
    """This machine and device, as the cache key names them (host, CPU model, GPU name)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else ""
    return f"{platform.node()}|{cpu}|{os.cpu_count()}|{device}|{gpu}"


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _runner(module: nn.Module, inputs: torch.Tensor, settings: LatencySettings) -> Callable[[], object]:
    """One forward pass of a copy of ``module`` on ``inputs`` with the settings' backend."""
    if settings.backend == "onnxruntime":
        return onnx_runner(module, inputs, settings.threads)
    device = torch.device(settings.device)
    model, x = copy.deepcopy(module).to(device).eval(), to_device(inputs, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def run() -> None:
        model(x)
        sync()  # CUDA runs asynchronously: wait for it, or only the launch is timed

    return run


def real_timer(settings: LatencySettings, warmup: int = 3) -> Timer:
    """The timer of this machine: interleaved wall-clock runs with the settings' backend and threads."""

    kept: dict[str, tuple[nn.Module, Callable[[], object]]] = {}  # the base's runner, made once

    def runner(name: str, module: nn.Module, inputs: torch.Tensor) -> Callable[[], object]:
        if name != "base":
            return _runner(module, inputs, settings)
        if name not in kept or kept[name][0] is not module:
            kept[name] = (module, _runner(module, inputs, settings))  # an ONNX export takes a while
        return kept[name][1]

    def time_cases(cases: Mapping[str, tuple[nn.Module, torch.Tensor]], repeats: int) -> dict[str, list[float]]:
        with _threads(settings.threads):
            runners = {name: runner(name, module, inputs) for name, (module, inputs) in cases.items()}
            return interleaved(runners, repeats, warmup)

    return time_cases


@dataclass(frozen=True)
class Timing:
    """One model's latency, load-corrected against the base model timed in the same loop."""

    ms: float  # median ratio to the base, times the base's latency at the start
    spread_ms: float  # half the inter-quartile range of the repeats, in the same terms
    raw_ms: float  # median as timed, uncorrected
    repeats: int


def _quartiles(values: np.ndarray) -> tuple[float, float]:
    """(median, half the inter-quartile range)."""
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q2), float(q3 - q1) / 2


class Meter:
    """Times whole models end to end, each in one loop with the base model.

    Example:
        >>> meter = Meter(base, LatencySettings())
        >>> meter.time(pruned).ms < meter.base_ms
        True
    """

    def __init__(self, base: nn.Module, settings: LatencySettings, timer: Timer | None = None,
                 repeats: int = REPEATS) -> None:
        self.base, self.settings, self.repeats = base, settings, repeats
        self.timer = timer or real_timer(settings)
        self.inputs = settings.inputs()
        samples = np.asarray(self.timer({"base": (base, self.inputs)}, 2 * repeats)["base"])
        self.base_ms, self.base_spread_ms = _quartiles(samples)

    def time(self, model: nn.Module, limit: float = math.inf) -> Timing:
        """``model``'s latency; timed again (up to :data:`RETIMES` rounds) while within noise of ``limit``."""
        cases = {"base": (self.base, self.inputs), "model": (model, self.inputs)}
        base: list[float] = []
        ours: list[float] = []
        for round_ in range(1 + RETIMES):
            found = self.timer(cases, self.repeats * (1 if round_ == 0 else 2))
            base += found["base"]
            ours += found["model"]
            ratio, spread = _quartiles(np.asarray(ours) / np.maximum(np.asarray(base), 1e-12))
            timing = Timing(ratio * self.base_ms, spread * self.base_ms, float(np.median(ours)), len(ours))
            if abs(timing.ms - limit) > timing.spread_ms:
                break
        return timing


def _cache_path(settings: LatencySettings) -> Path:
    folder = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autoprune" / "latency")
    return folder / f"{settings.cache_key()}.json"


def _layer_key(module: nn.Module, shape: tuple[int, ...]) -> str:
    """What a layer's latency depends on besides its widths' shares: its kind, geometry and full widths."""
    if isinstance(module, nn.Linear):
        geometry = f"bias={module.bias is not None}"
    else:
        geometry = (f"k={module.kernel_size},s={module.stride},p={module.padding},d={module.dilation},"
                    f"g={'dw' if _depthwise(module) else module.groups},bias={module.bias is not None}")
    return f"{type(module).__name__}|{geometry}|input={list(shape)}|out={_widths(module)[1]}"


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _with_widths(module: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """A fresh layer like ``module`` with ``c_in`` inputs and ``c_out`` outputs (depthwise: ``c_out`` alone)."""
    if isinstance(module, nn.Linear):
        return nn.Linear(c_in, c_out, bias=module.bias is not None)
    groups = module.groups
    if _depthwise(module):
        multiplier = module.out_channels // module.in_channels
        c_in = groups = max(1, c_out // multiplier)
        c_out = c_in * multiplier
    return type(module)(c_in, c_out, module.kernel_size, module.stride, module.padding, module.dilation, groups,
                        module.bias is not None)


def _grid(full: int, step: int, varies: bool) -> list[int]:
    """Widths to time a side at: shares of ``full`` in multiples of ``step`` (just ``full`` if fixed)."""
    if not varies:
        return [full]
    return sorted({max(step, int(round(share * full / step)) * step) for share in GRID} | {full})


def _input_shapes(model: nn.Module, example: object, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Each named layer's input shape without the batch dimension, as the example reaches it."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    hooks = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        with torch.inference_mode():
            model.eval()(to_device(example, next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


class LatencyModel:
    """Predicted latency (ms) of any plan over ``groups``: table lookups plus a fitted remainder.

    Example:
        >>> latency = LatencyModel(groups, CostModel(groups), Meter(model, LatencySettings()))
        >>> latency.predict({g.id: g.channels // 2 for g in groups})
        1.8...
    """

    def __init__(self, groups: ChannelGroups, costs: CostModel, meter: Meter,
                 plans: int = CALIBRATION_PLANS, round_to: int = 1) -> None:
        self.costs, self.settings, self.round_to = costs, meter.settings, round_to
        modules = dict(groups.model.named_modules())
        rows = [i for i, n in enumerate(costs.names) if type(modules.get(n)) in TIMED]
        shapes = _input_shapes(groups.model, groups.example_input, [costs.names[i] for i in rows])
        rows = [i for i in rows if costs.names[i] in shapes]  # a layer the example never reaches costs nothing
        self.rows = np.array(rows, dtype=int)
        path = _cache_path(self.settings)
        cache = json.loads(path.read_text()) if path.is_file() else {}
        layers, calibrations = cache.setdefault("layers", {}), cache.setdefault("calibrations", {})
        keys = [_layer_key(modules[costs.names[i]], shapes[costs.names[i]]) for i in rows]
        for i, key in zip(rows, keys):
            if key not in layers:
                name = costs.names[i]
                layers[key] = _time_layer(modules[name], shapes[name], costs.m_in[i].any(),
                                          costs.m_out[i].any(), meter)
        if "call_ms" not in cache:  # a layer timed alone pays one call's overhead the model pays once
            found = meter.timer({"layer:empty": (nn.Identity(), meter.settings.inputs((1,)))}, LAYER_REPEATS)
            cache["call_ms"] = float(np.median(found["layer:empty"]))
        self._stack([layers[k] for k in keys], cache["call_ms"])
        self.channelwise = ~costs.bilinear
        arch = hashlib.sha1(json.dumps([keys, costs.names, costs.ids, costs.channels.tolist(), round_to,
                                        FIT_VERSION]).encode())
        arch_key = arch.hexdigest()[:16]
        anchors = cache.setdefault("calibration_base_ms", {})
        if arch_key not in calibrations:
            calibrations[arch_key] = self._calibrate(groups, meter, plans).tolist()
            anchors[arch_key] = meter.base_ms
        self.coef = np.asarray(calibrations[arch_key])
        # A cached fit was timed another day, when the machine may have run faster or slower (load, clock):
        # predictions follow the base model as timed now against the base as timed for the fit.
        self.scale = meter.base_ms / anchors.get(arch_key, meter.base_ms)
        cache["settings"] = {k: v for k, v in self.settings.config().items() if k != "latency_input_shape"}
        write_json(path, cache)

    def _stack(self, entries: list[dict], call_ms: float) -> None:
        """Every layer's grid less the call overhead, padded to one shape, for vectorised lookups."""
        size = len(GRID) + 1
        pad = lambda xs: np.asarray(xs + [xs[-1]] * (size - len(xs)), dtype=np.float64)  # noqa: E731
        self.x_in = np.stack([pad(e["in"]) for e in entries]) if entries else np.zeros((0, size))
        self.x_out = np.stack([pad(e["out"]) for e in entries]) if entries else np.zeros((0, size))
        table = np.zeros((len(entries), size, size))
        for row, entry in enumerate(entries):
            ms = np.maximum(np.asarray(entry["ms"], dtype=np.float64) - call_ms, 0.0)
            table[row] = np.pad(ms, ((0, size - ms.shape[0]), (0, size - ms.shape[1])), mode="edge")
        self.table = table

    def features(self, keep: np.ndarray) -> np.ndarray:
        """[summed layer latency (ms), channel-wise FLOPs (M thop MACs), 1] for channels kept per group."""
        r_in, r_out = self.costs.shares(keep)
        rows = self.rows
        c_in, c_out = r_in[rows] * self.costs.c_in[rows], r_out[rows] * self.costs.c_out[rows]
        i, t = _locate(self.x_in, c_in)
        j, u = _locate(self.x_out, c_out)
        r = np.arange(len(rows))
        t_ = self.table
        layers = ((1 - t) * (1 - u) * t_[r, i, j] + t * (1 - u) * t_[r, i + 1, j]
                  + (1 - t) * u * t_[r, i, j + 1] + t * u * t_[r, i + 1, j + 1]).sum()
        channelwise = float(self.costs.flops0[self.channelwise] @ r_out[self.channelwise]) / 1e6
        return np.array([layers, channelwise, 1.0])

    def predict_vector(self, keep: np.ndarray) -> float:
        """Latency (ms) for channels kept per group, in ``costs.ids`` order: arithmetic only."""
        return float(self.scale * (self.coef @ self.features(keep)))

    def predict(self, keep: Mapping[str, int]) -> float:
        """Latency (ms) of the model that keeps ``keep[gid]`` channels per group."""
        return self.predict_vector(self.costs.keep_vector(keep))

    def _calibrate(self, groups: ChannelGroups, meter: Meter, plans: int) -> np.ndarray:
        """Fit what the layers leave out on the base and ``plans`` random plans timed whole.

        The plans round channels as the search does: onnxruntime's kernels are several times
        slower on channel counts that are not multiples of 8, and a fit on such plans (which the
        search never builds) overestimated rounded plans by 70-570 %.
        """
        from scipy.optimize import nnls


        rng = np.random.default_rng(0)
        keeps = [self.costs.channels] + [keep_counts(self.costs, rng.uniform(0.0, 0.85, len(self.costs.ids)),
                                                     self.round_to) for _ in range(plans)]
        measured = [meter.base_ms] + [meter.time(groups.apply(groups.plan(
            dict(zip(self.costs.ids, k.astype(int).tolist()))))).ms for k in keeps[1:]]
        # Weighted by 1 / latency, the fit minimises relative error, the error the budget feels; unweighted,
        # the base and the large plans outweighed the small ones (mobilenet_v2 on onnxruntime: 90th
        # percentile 22-24 % unweighted on 8 plans, 15 % weighted on 16, in a hold-out test on the
        # benchmark's plans).
        weights = 1.0 / np.maximum(np.asarray(measured), 1e-12)
        coef, _ = nnls(np.stack([self.features(k) for k in keeps]) * weights[:, None], np.asarray(measured) * weights)
        return coef


def _locate(xs: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the grid cell holding ``x`` and the position within it (clipped at the ends)."""
    i = np.clip((xs <= x[:, None]).sum(axis=1) - 1, 0, xs.shape[1] - 2)
    r = np.arange(len(x))
    low, high = xs[r, i], xs[r, i + 1]
    t = np.where(high > low, (x - low) / np.where(high > low, high - low, 1.0), 0.0)
    return i, np.clip(t, 0.0, 1.0)


def _time_layer(module: nn.Module, shape: tuple[int, ...], in_varies: bool, out_varies: bool,
                meter: Meter) -> dict[str, list]:
    """Time one layer alone over the grid of its widths (depthwise: over its channels alone)."""
    c_in, c_out = _widths(module)
    depthwise = _depthwise(module)
    step = c_out // c_in if depthwise else getattr(module, "groups", 1)
    ins = [c_in] if depthwise else _grid(c_in, step, in_varies)
    outs = _grid(c_out, step, out_varies or in_varies) if depthwise else _grid(c_out, step, out_varies)
    cases = {}
    for a in ins:
        for b in outs:
            layer = _with_widths(module, a, b)
            cases[f"layer:{a}:{b}"] = (layer, meter.settings.inputs((_widths(layer)[0], *shape[1:])))
    found = meter.timer(cases, LAYER_REPEATS)
    return {"in": [float(a) for a in ins], "out": [float(b) for b in outs],
            "ms": [[float(np.median(found[f"layer:{a}:{b}"])) for b in outs] for a in ins]}


class LatencyCosts:
    """A :class:`CostModel` that also predicts latency and times built models: what the budget's
    projection and :func:`~autoprune.cost.budget.fit_plan` need under a latency cap.

    ``predict_vector`` gives (FLOPs, params, latency ms); everything else is the cost model's.

    Example:
        >>> costs = LatencyCosts(CostModel(groups), latency_model, meter)
        >>> costs.predict(groups.full()).latency == latency_model.predict(groups.full())
        True
    """

    def __init__(self, costs: CostModel, latency: LatencyModel, meter: Meter) -> None:
        self.costs, self.latency, self.meter = costs, latency, meter
        self.last: Timing | None = None

    def __getattr__(self, name: str) -> Any:
        if name in ("costs", "latency", "meter"):  # not yet set (copying): no recursion
            raise AttributeError(name)
        return getattr(self.costs, name)

    @property
    def base(self) -> Cost:
        return Cost(self.costs.base.flops, self.costs.base.params, self.meter.base_ms)

    def predict_vector(self, keep: np.ndarray) -> tuple[float, float, float]:
        return (*self.costs.predict_vector(keep), self.latency.predict_vector(keep))

    def predict(self, keep: Mapping[str, int]) -> Cost:
        return Cost(*self.predict_vector(self.costs.keep_vector(keep)))

    def measure(self, model: nn.Module, limit: float = math.inf) -> float:
        """The built model's latency (ms) as :class:`Meter` times it; kept as ``last``."""
        self.last = self.meter.time(model, limit)
        return self.last.ms


def latency_costs(groups: ChannelGroups, costs: CostModel, meter: Meter, round_to: int = 1) -> LatencyCosts:
    """The cost model with latency, its table measured (or read from the cache) for ``meter``'s settings
    and fitted on plans that keep multiples of ``round_to`` channels, as the search's do."""
    return LatencyCosts(costs, LatencyModel(groups, costs, meter, round_to=round_to), meter)


ATTRS = ("latency_ms", "latency_share", "latency_spread_ms", "latency_raw_ms", "latency_predicted_ms")


def trial_latency(meter: Meter, costs: CostModel | LatencyCosts, keep: Mapping[str, int], model: nn.Module,
                  cost: Cost) -> dict[str, float]:
    """A candidate's latency as a trial records it: measured (already, under a latency cap), its
    share of the base, the spread of the repeats, and the predictor's value where there is one."""
    timing = costs.last if isinstance(costs, LatencyCosts) and math.isfinite(cost.latency) else meter.time(model)
    found = {"latency_ms": timing.ms, "latency_share": timing.ms / meter.base_ms,
             "latency_spread_ms": timing.spread_ms, "latency_raw_ms": timing.raw_ms}
    if isinstance(costs, LatencyCosts):
        found["latency_predicted_ms"] = costs.latency.predict(keep)
    return found


def describe(attrs: Mapping[str, Any]) -> str:
    """A trial line's latency part ('' for a trial that recorded none)."""
    if "latency_ms" not in attrs:
        return ""
    predicted = attrs.get("latency_predicted_ms")
    return (f" | latency {attrs['latency_ms']:.3g} ± {attrs['latency_spread_ms']:.2g} ms "
            f"({attrs['latency_share']:.1%} of base" + (f", predicted {predicted:.3g})" if predicted else ")"))


def check(base: nn.Module, pruned: nn.Module, settings: LatencySettings, limit: float | None = None,
          share: float | None = None, timer: Timer | None = None) -> dict[str, Any]:
    """Time ``pruned`` against ``base`` afresh (as export does) and against the budget's latency cap.

    ``limit`` is the cap in ms, or ``share`` the cap as a share of the base's latency measured now,
    in the same loop (a relative budget: the search's milliseconds are another loop's). Both models
    are timed in a fresh process, with a clean thread pool and allocator (in the search's process one
    re-time read a 42.5 % share where a fresh process read 36.1 %); with ``timer``, here.

    Example:
        >>> check(base, pruned, LatencySettings(), share=0.5)["within_budget"]
        True
    """
    if timer is not None:
        return _check(base, pruned, settings, limit, share, timer)
    try:
        return {**_in_fresh_process(base, pruned, settings, limit, share), "timed_in": "a fresh process"}
    except (OSError, subprocess.SubprocessError, ValueError) as err:  # it is a check: time it here rather than fail
        why = " ".join(str(err).split())[-200:]
        return {**_check(base, pruned, settings, limit, share), "timed_in": f"this process (a fresh one failed: {why})"}


def check_budget(base: nn.Module, pruned: nn.Module, budget: Budget, settings: LatencySettings,
                 timer: Timer | None = None) -> dict[str, Any]:
    """:func:`check` against ``budget``'s latency cap: a relative one as a share of the base timed in the
    same loop, not against the search's milliseconds (another loop's)."""
    cap = {"share": budget.latency} if budget.latency_relative else {"limit": budget.latency}
    return check(base, pruned, settings, timer=timer, **cap)


def _check(base: nn.Module, pruned: nn.Module, settings: LatencySettings, limit: float | None,
           share: float | None, timer: Timer | None = None) -> dict[str, Any]:
    meter = Meter(base, settings, timer)
    timing = meter.time(pruned)
    cap = meter.base_ms * share if share is not None else limit
    result = {"measured_ms": round(timing.ms, 4), "spread_ms": round(timing.spread_ms, 4),
              "base_ms": round(meter.base_ms, 4), "share_of_base": round(timing.ms / meter.base_ms, 4),
              **settings.config()}
    if cap is not None:
        result.update(limit_ms=round(cap, 4), share_of_limit=round(timing.ms / cap, 4),
                      within_budget=bool(timing.ms <= cap + timing.spread_ms))
    return result


def _in_fresh_process(base: nn.Module, pruned: nn.Module, settings: LatencySettings, limit: float | None,
                      share: float | None) -> dict[str, Any]:
    """:func:`_check` in a new Python process, the models handed over in a file (their classes by value)."""
    package = str(Path(__file__).resolve().parents[2])  # the child imports this autoprune, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="autoprune-check-") as folder:
        models = Path(folder) / "models.pt"
        save_torch({"base": base, "pruned": pruned}, models)
        task = json.dumps({"models": str(models), "settings": settings.config(), "limit": limit, "share": share})
        done = subprocess.run([sys.executable, "-c", "from autoprune.cost.latency import _check_main; _check_main()"],
                              input=task, capture_output=True, text=True, env=env, timeout=1800)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise subprocess.SubprocessError((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
    return json.loads(lines[-1])


def _check_main() -> None:
    """The fresh process's side of :func:`check`: the task on stdin, the result as the last line out."""
    task = json.loads(sys.stdin.read())
    models = torch.load(task["models"], map_location="cpu", weights_only=False)
    found = _check(models["base"], models["pruned"], LatencySettings.from_config(task["settings"]),
                   task["limit"], task["share"])
    print(json.dumps(found))


def with_device(settings: LatencySettings, device: torch.device, input_shape: tuple[int, ...],
                listed: bool = False) -> LatencySettings:
    """The settings on the search's device (torch backend) and its model's input: its shape, and whether it
    is a list of images."""
    return replace(settings, device=str(device), input_shape=tuple(input_shape), listed=listed)
