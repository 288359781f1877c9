"""Measured performance figures: compiled FLOPs, a matmul peak on the same devices, MFU, host memory."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp


def compiled_flops(compiled: Any) -> float:
  """FLOPs of one call of a compiled jitted function, from XLA's cost analysis (0 when unavailable)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def time_call(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall-clock seconds of `fn(*args)` (results blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def matmul_peak_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of a large square matmul on the default device: the practical peak for MFU."""
  a = jnp.ones((size, size), dtype)
  b = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  seconds = time_call(matmul, a, b, repeats=repeats)
  return 2.0 * size ** 3 / seconds


def peak_host_memory_mb() -> float:
  """Peak resident set size of this process, MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
