"""Which parameters train: regexes on '/'-joined parameter paths, from the config.

`frozen` patterns win over `trainable` ones; a pattern that matches no parameter is an error (it is almost
always a typo, and a silently unfrozen 7B LLM is expensive).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from flax.core import meta

from unires_jax.tree_paths import param_path  # noqa: F401  (re-exported)


def path_map(fn, tree: Any) -> Any:
  """`fn(path_str, leaf)` over a params tree."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(param_path(p), x), tree)


def trainable_mask(params: Any, trainable: Sequence[str] = (".*",), frozen: Sequence[str] = ()) -> Any:
  """Tree of bools: True where a parameter trains."""
  trainable_re = [re.compile(p) for p in trainable]
  frozen_re = [re.compile(p) for p in frozen]
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern in list(trainable_re) + list(frozen_re):
    if not any(pattern.match(path) for path in paths):
      raise ValueError(f"parameter pattern {pattern.pattern!r} matches no parameter; paths look like "
                       f"{paths[:3]}")
  return path_map(lambda path, _: any(p.match(path) for p in trainable_re)
                  and not any(p.match(path) for p in frozen_re), params)


def _is_boxed(x) -> bool:
  return isinstance(x, meta.AxisMetadata)


def matching_patterns(params: Any, patterns: Sequence[str]) -> tuple[str, ...]:
  """The patterns that match at least one parameter path (for optional pattern lists)."""
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return tuple(p for p in patterns if any(re.match(p, path) for path in paths))


def split(params: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen): the same tree twice, with `None` where a leaf belongs to the other part.

  Logically-partitioned boxes (during init) count as leaves, so their metadata travels with them.
  """
  trainable = jax.tree.map(lambda x, m: x if m else None, params, mask, is_leaf=_is_boxed)
  frozen = jax.tree.map(lambda x, m: None if m else x, params, mask, is_leaf=_is_boxed)
  return trainable, frozen


def merge(trainable: Any, frozen: Any) -> Any:
  return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


def count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
