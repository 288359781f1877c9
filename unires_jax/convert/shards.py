"""Sharded safetensors in the Hugging Face layout, written one tensor at a time and read back, without JAX.

`ShardWriter` keeps at most one shard's tensors in memory (`max_shard_bytes`), casts floating tensors to the dtype
asked for, and on `close()` names the shards `{prefix}-0000i-of-0000n.safetensors` with a
`{prefix}.safetensors.index.json` (`metadata.total_size`, `weight_map`), or writes the single
`{prefix}.safetensors` when everything fits one shard — what `from_pretrained` reads. `load_sharded` reads either
layout into torch tensors, checking that every shard the index names exists and holds what the index says.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
METADATA = {"format": "pt"}


def parse_size(text: str) -> int:
  """`2GB`, `500MB`, `1.5GiB`, or a number of bytes → bytes (a `max_shard_bytes` from the command line)."""
  units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "b": 1}
  lowered = text.strip().lower()
  for unit in sorted(units, key=len, reverse=True):
    if lowered.endswith(unit):
      return int(math.floor(float(lowered[:-len(unit)]) * units[unit]))
  return int(lowered)


def numpy_dtype(name: str):
  """`float32` / `bfloat16` / `float16` → the numpy dtype (bfloat16 from ml_dtypes)."""
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r}: expected one of {DTYPES}")
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def index_file(prefix: str) -> str:
  return f"{prefix}.safetensors.index.json"


class ShardWriter:
  """Writes tensors into `directory` as (sharded) `{prefix}.safetensors`; floating tensors cast to `dtype`."""

  def __init__(self, directory: str, prefix: str = "model", dtype: str = "float32",
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.prefix, self.max_shard_bytes = directory, prefix, int(max_shard_bytes)
    self.dtype = numpy_dtype(dtype)
    self._buffer: dict[str, np.ndarray] = {}
    self._buffer_bytes = 0
    self._shards: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
    self.total_size = 0
    self.names: set[str] = set()

  def add(self, name: str, array: Any) -> None:
    if name in self.names:
      raise KeyError(f"{self.prefix}: tensor {name!r} written twice")
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
      array = array.astype(self.dtype, copy=False)
    array = np.ascontiguousarray(array)
    if self._buffer and self._buffer_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._buffer[name] = array
    self._buffer_bytes += array.nbytes
    self.total_size += array.nbytes
    self.names.add(name)

  def _flush(self) -> None:
    from safetensors.numpy import save_file

    path = os.path.join(self.directory, f"{self.prefix}.part{len(self._shards):05d}.safetensors")
    save_file(self._buffer, path, metadata=METADATA)
    self._shards.append((path, list(self._buffer)))
    self._buffer, self._buffer_bytes = {}, 0

  def close(self) -> list[str]:
    """Writes the last shard and the index; returns the file names written (relative to `directory`)."""
    if self._buffer or not self._shards:
      self._flush()
    count = len(self._shards)
    if count == 1:
      final = f"{self.prefix}.safetensors"
      os.replace(self._shards[0][0], os.path.join(self.directory, final))
      return [final]
    weight_map, files = {}, []
    for number, (path, names) in enumerate(self._shards, start=1):
      final = f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
      os.replace(path, os.path.join(self.directory, final))
      weight_map.update({name: final for name in names})
      files.append(final)
    with open(os.path.join(self.directory, index_file(self.prefix)), "w") as f:
      json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)
    return files + [index_file(self.prefix)]


def load_sharded(directory: str, prefix: str = "model") -> dict:
  """`{prefix}.safetensors` or the shards its index lists → {name: torch tensor}."""
  from safetensors.torch import load_file

  index = os.path.join(directory, index_file(prefix))
  single = os.path.join(directory, f"{prefix}.safetensors")
  if not os.path.exists(index):
    if not os.path.exists(single):
      raise FileNotFoundError(f"{directory!r} holds neither {prefix}.safetensors nor {index_file(prefix)}")
    return load_file(single)
  with open(index) as f:
    try:
      weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index!r}: expected JSON with a 'weight_map' {{tensor: shard file}} ({e})") from e
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    path = os.path.join(directory, shard)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{index!r} lists shard {shard!r}, which is not in {directory!r}")
    tensors.update(load_file(path))
  for name, shard in weight_map.items():
    if name not in tensors:
      raise KeyError(f"{index!r}: tensor {name!r} is listed in {shard!r} but that shard does not hold it")
  return tensors
