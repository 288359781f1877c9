"""XLA:CPU compiler flags the project runs with, set in this one place before JAX starts its CPU backend.

`apply()` runs when `unires_jax` is imported: it appends to `XLA_FLAGS` the flags below that the environment does
not already set (a flag the user sets wins), for the jaxlib versions they were measured on. XLA reads `XLA_FLAGS`
when it creates its first backend, so importing `unires_jax` after a JAX computation has run leaves them unapplied.

- `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions). jaxlib 0.10's XLA:CPU hands dots and the
  elementwise ops around them to YNNPACK as one fused graph. For a ConvNeXt block it pulls in the 49 taps of the
  depthwise convolution, which XLA then materialises as separate full-size inputs: one ConvNeXt-L stage-3 block at
  64×64×768 takes 522 ms with the fusions and 189 ms without (HF PyTorch: about 390 ms), and the LLaMA and CLIP
  matmuls run as fast without them (docs/benchmarks.md, "XLA:CPU flags").

The flags only touch the CPU backend's compiler; GPU and TPU runs are unchanged.
"""

from __future__ import annotations

import importlib.metadata
import os

# flag name → (value, jaxlib versions "major.minor" it is known to exist in: an unknown XLA flag aborts the process)
CPU_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "xla_cpu_experimental_ynn_fusion_type": ("", ("0.10",)),
}


def _jaxlib_minor() -> str | None:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return ".".join(version.split(".")[:2])


def flags_to_add(current: str, jaxlib_minor: str | None) -> list[str]:
  """The `--name=value` flags of `CPU_FLAGS` missing from the `XLA_FLAGS` string `current` for this jaxlib."""
  present = {part.lstrip("-").split("=", 1)[0] for part in current.split()}
  return [f"--{name}={value}" for name, (value, versions) in CPU_FLAGS.items()
          if name not in present and jaxlib_minor in versions]


def apply(environ=os.environ) -> list[str]:
  """Appends the missing flags to `environ["XLA_FLAGS"]`; returns what it added."""
  added = flags_to_add(environ.get("XLA_FLAGS", ""), _jaxlib_minor())
  if added:
    environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", "")] + added).strip()
  return added
