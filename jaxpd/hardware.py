"""Peak figures of accelerators, for MFU/MBU in benchmarks (and, later, the placer's catalog).

Dense peak FLOP/s at the dtype serving uses (bf16; tensor cores, no sparsity) and HBM bandwidth,
from the vendors' data sheets. CPUs have no fixed figure: `measure_cpu_peaks` times a matmul and
a copy on the machine at hand.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    name: str
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    memory: float  # bytes


PEAKS = {
    "H100": DevicePeaks("H100 SXM", 989e12, 3.35e12, 80e9),
    "H200": DevicePeaks("H200 SXM", 989e12, 4.8e12, 141e9),
    "A100": DevicePeaks("A100 SXM 80GB", 312e12, 2.04e12, 80e9),
    "L4": DevicePeaks("L4", 121e12, 0.3e12, 24e9),
    "TPU v5 lite": DevicePeaks("TPU v5e", 197e12, 0.82e12, 16e9),
    "TPU v6 lite": DevicePeaks("TPU v6e", 918e12, 1.64e12, 32e9),
}


def lookup(device: jax.Device) -> DevicePeaks | None:
    kind = device.device_kind
    for key, peaks in PEAKS.items():
        if key.lower() in kind.lower():
            return peaks
    return None


def _best_seconds(fn, arg, repeats: int) -> float:
    fn(arg).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_peaks(dtype=jnp.float32, size: int = 1024, repeats: int = 10) -> DevicePeaks:
    """Measured matmul FLOP/s and weight-streaming bandwidth of the default device (for CPUs).

    The bandwidth is that of a skinny matmul over a 256 MiB matrix (past the caches), which is
    how a decode step reads its weights: XLA runs it on every core. An elementwise pass (one
    thread's copy) measured a third of it on the development VM, and the placer's calibration
    then fitted a memory efficiency of 3.4, which no device achieves."""
    flops = 2 * size ** 3 / _best_seconds(jax.jit(lambda x: x @ x), jnp.ones((size, size), dtype), repeats)
    weights = jnp.ones((8192, 8192), jnp.float32)  # 256 MiB
    rows = jnp.ones((8192, 8), jnp.float32)
    seconds = _best_seconds(jax.jit(lambda w: w @ rows), weights, repeats)
    return DevicePeaks("cpu (measured)", flops, weights.nbytes / seconds, 0.0)
