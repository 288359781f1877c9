"""Measured performance figures for `scripts/benchmark_*.py`: compiled FLOPs, timing, a matmul peak on the same
devices, host memory, the machine a figure was measured on and the devices to measure on. Their options and report
files: `benchmark_io.py`."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from typing import Any, Sequence

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


# The vector extensions that decide XLA:CPU's and PyTorch's kernels; two x86 CPUs with the same core count gave JAX
# 1.6-2.0x and 0.67-0.93x of PyTorch on the same modules (docs/benchmarks.md), so a figure names the CPU it ran on.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu_description(cpuinfo: str | None = None) -> str:
  """The CPU's model name and which of `CPU_FEATURES` it has, from `/proc/cpuinfo` (`cpuinfo`: its text)."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return platform.processor() or platform.machine()
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() not in fields:  # the first processor's entry
      fields[key.strip()] = value.strip()
  name = fields.get("model name") or platform.processor() or platform.machine()
  flags = set(fields.get("flags", "").split())
  present = [feature for feature in CPU_FEATURES if feature in flags]
  return f"{name} ({', '.join(present) or 'none of ' + '/'.join(CPU_FEATURES)})"


def machine(devices: Sequence[jax.Device] | None = None) -> dict:
  """The devices a figure was measured on (all of JAX's by default), the host's CPU and JAX's version."""
  devices = list(jax.devices() if devices is None else devices)
  return dict(platform=devices[0].platform, device_kind=devices[0].device_kind, device_count=len(devices),
              cpu_count=os.cpu_count(), processor=cpu_description(), jax_version=jax.__version__)


def select_devices(count: int) -> list[jax.Device]:
  """The first `count` of JAX's devices (`--devices`; 0 means all of them)."""
  available = jax.devices()
  if not 0 <= count <= len(available):
    raise ValueError(f"--devices {count}: expected 0 (all) to {len(available)}, the number of "
                     f"{available[0].platform} devices available")
  return available[:count] if count else available

