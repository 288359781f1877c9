"""Per-program XLA:CPU compiler options, chosen in this one place from what the program runs.

XLA reads `XLA_FLAGS` once per process, so a flag there would hold for every program; the options here go to
`jax.jit(..., compiler_options=...)` of one program instead, and only where they were measured to help
(docs/benchmarks.md, "XLA:CPU options"). jaxlib 0.10, 2-core CPU, 2026-12-04:

- `xla_cpu_experimental_ynn_fusion_type=""` (no YNNPACK fusions; XLA's default fuses reductions). With the
  default, one ConvNeXt-L block at 256×256×192 takes 0.76 s and at 64×64×768 0.28 s; without the fusions 0.44 s
  and 0.19 s. The same setting for every program made the tiny model's AdamW step 3.2× slower (0.071 → 0.225 s)
  and the toy main job's step 2.3× slower (0.122 → 0.287 s), so it applies only to programs that run a ConvNeXt
  with a canvas of `NO_YNN_MIN_CONVNEXT_SIDE` px or more (the 7B config's 1024 px).

GPU and TPU programs get no options. A user's `XLA_FLAGS` still applies to every program.
"""

from __future__ import annotations

import importlib.metadata

NO_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
NO_YNN_MIN_CONVNEXT_SIDE = 1024
KNOWN_JAXLIB = ("0.10",)  # an option this XLA does not know is refused at compile time


def _jaxlib_minor() -> str | None:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return ".".join(version.split(".")[:2])


def compiler_options(convnext_image_size: int | None, backend: str | None = None,
                     jaxlib_minor: str | None = None) -> dict[str, str] | None:
  """The `compiler_options` for a program whose ConvNeXt canvas is `convnext_image_size` px (None: no ConvNeXt)."""
  import jax  # here, so that importing the package starts no backend

  backend = backend or jax.default_backend()
  jaxlib_minor = jaxlib_minor or _jaxlib_minor()
  if backend != "cpu" or jaxlib_minor not in KNOWN_JAXLIB:
    return None
  if convnext_image_size is not None and convnext_image_size >= NO_YNN_MIN_CONVNEXT_SIDE:
    return dict(NO_YNN_FUSIONS)
  return None


def for_model_config(model_config) -> dict[str, str] | None:
  """`compiler_options` for a program that runs the UniRES model of `model_config` (`configs/common.py`)."""
  convnext = model_config.get("convnext") if hasattr(model_config, "get") else None
  return compiler_options(int(convnext["image_size"]) if convnext else None)
