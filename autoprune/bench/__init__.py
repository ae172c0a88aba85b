"""Benchmarks: autoprune against baselines at equal wall time, the latency predictor, the MLP sweep."""

from autoprune.bench.equal_time import BenchConfig, benchmark
from autoprune.bench.latency import bench_latency
from autoprune.bench.mlp_sweep import mlp_sweep

__all__ = ["BenchConfig", "benchmark", "bench_latency", "mlp_sweep"]


def __getattr__(name: str):  # autoprune.bench was a module; its other names still resolve
    from autoprune._moved import old_attribute

    return old_attribute(__name__, name)
