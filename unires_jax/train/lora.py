"""LoRA on selected kernels, as a pure transform of the parameter tree (no change to the model code).

LoRA factors live under the top-level `lora` key of the params tree, keyed by the target kernel's path with
'/' replaced by '.'. Before every forward, `merge_lora` adds `(alpha / rank) · A @ B` to each target kernel; the
base kernels are frozen by config and the factors train. `B` starts at zero, so the initial model is unchanged.
A kernel is viewed as `[*stack, in, out]`: `stack` is the scan layer axis for paths under a stacked prefix,
`in` is the first `n_in` remaining axes (e.g. 2 for an attention output kernel `[H, Dh, D]`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from unires_jax.models.lora import LORA_KEY, merge_lora  # noqa: F401  (re-exported)
from unires_jax.tree_paths import param_path


def _targets(params: Any, targets: Sequence[tuple[str, int]]) -> dict[str, tuple[jax.Array, int]]:
  compiled = [(re.compile(pattern), int(n_in)) for pattern, n_in in targets]
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path_str = param_path(path)
    for pattern, n_in in compiled:
      if pattern.fullmatch(path_str):
        found[path_str] = (leaf, n_in)
        break
  if not found:
    raise ValueError(f"LoRA targets {[p for p, _ in targets]} match no parameter")
  return found


def _split_dims(path: str, shape, n_in: int, stacked_prefixes: Sequence[str]) -> tuple[int, int, int]:
  n_stack = 1 if any(path.startswith(p) for p in stacked_prefixes) else 0
  stack = math.prod(shape[:n_stack])
  fan_in = math.prod(shape[n_stack:n_stack + n_in])
  fan_out = math.prod(shape[n_stack + n_in:])
  return stack, fan_in, fan_out


def init_lora(params: Any, rng: jax.Array, targets: Sequence[tuple[str, int]], rank: int,
              stacked_prefixes: Sequence[str] = ("llm/layers/",)) -> dict:
  """{'path.to.kernel': {'a': [S, in, r], 'b': [S, r, out]}} for every target kernel."""
  lora = {}
  for index, (path, (kernel, n_in)) in enumerate(sorted(_targets(params, targets).items())):
    stack, fan_in, fan_out = _split_dims(path, kernel.shape, n_in, stacked_prefixes)
    a = jax.random.normal(jax.random.fold_in(rng, index), (stack, fan_in, rank), jnp.float32) / math.sqrt(fan_in)
    lora[path.replace("/", ".")] = {"a": a.astype(kernel.dtype), "b": jnp.zeros((stack, rank, fan_out), kernel.dtype)}
  return lora


