"""Applying LoRA factors: the model's parameters with every low-rank delta added to its kernel.

Factors live under the top-level `lora` key of the params tree, keyed by the target kernel's path with '/' replaced
by '.', each `{a: [S, in, r], b: [S, r, out]}` (`S` the scan layer axis, 1 when unstacked). Training creates and
freezes them (`train/lora.py`); inference, export and the train step all merge through this one function.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from unires_jax.tree_paths import param_path

LORA_KEY = "lora"


def merge_lora(params: Any, alpha: float, rank: int) -> Any:
  """The model parameters (without the `lora` key) with every LoRA delta added to its kernel."""
  if LORA_KEY not in params:
    return params
  lora = params[LORA_KEY]
  base = {k: v for k, v in params.items() if k != LORA_KEY}
  scale = alpha / rank

  def add_delta(path, kernel):
    key = param_path(path).replace("/", ".")
    if key not in lora:
      return kernel
    factors = lora[key]
    delta = jnp.einsum("sir,sro->sio", factors["a"], factors["b"]) * scale  # [S, in, out]
    return kernel + delta.reshape(kernel.shape).astype(kernel.dtype)

  return jax.tree_util.tree_map_with_path(add_delta, base)
