"""Declarative JAX ↔ PyTorch parameter tables.

A table is a list of `Entry`s, each mapping one JAX parameter path (`'/'`-joined, as in the Flax params tree) to
one or more PyTorch state-dict names, with a pair of small transforms. Layers stacked by `nn.scan` (a leading
`layers` axis) are written with `{i}` in the PyTorch name and `stacked=True`; they are stacked on import and split
on export. Importing is strict: a PyTorch tensor no entry claims, an entry whose tensor is missing, or a shape that
does not match the expected one is an error that names the tensor.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

ArrayFn = Callable[..., object]


def identity(x):
  return x


def linear_to_jax(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] → Flax Dense kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def linear_to_torch(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.T)


def conv_to_jax(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] → Flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One JAX parameter ↔ one or several PyTorch tensors.

  `to_jax` takes the PyTorch tensor(s) (one argument per name in `torch_names`) and returns the JAX array;
  `to_torch` is its inverse and returns one array or a tuple (one per name).
  """
  jax_path: str
  torch_names: tuple[str, ...]
  to_jax: ArrayFn = identity
  to_torch: ArrayFn = identity
  stacked: bool = False

  @classmethod
  def make(cls, jax_path: str, torch_names: str | Sequence[str], to_jax: ArrayFn = identity,
           to_torch: ArrayFn = identity, stacked: bool = False) -> "Entry":
    names = (torch_names,) if isinstance(torch_names, str) else tuple(torch_names)
    return cls(jax_path, names, to_jax, to_torch, stacked)


def linear(jax_prefix: str, torch_prefix: str, bias: bool = True, stacked: bool = False) -> list[Entry]:
  """Entries for a Dense ↔ Linear pair."""
  out = [Entry.make(f"{jax_prefix}/kernel", f"{torch_prefix}.weight", linear_to_jax, linear_to_torch, stacked)]
  if bias:
    out.append(Entry.make(f"{jax_prefix}/bias", f"{torch_prefix}.bias", stacked=stacked))
  return out


def norm(jax_prefix: str, torch_prefix: str, bias: bool = True, stacked: bool = False,
         scale_name: str = "scale") -> list[Entry]:
  """Entries for a LayerNorm/RMSNorm (Flax `scale`/`bias` ↔ torch `weight`/`bias`)."""
  out = [Entry.make(f"{jax_prefix}/{scale_name}", f"{torch_prefix}.weight", stacked=stacked)]
  if bias:
    out.append(Entry.make(f"{jax_prefix}/bias", f"{torch_prefix}.bias", stacked=stacked))
  return out


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, path))
    else:
      flat[path] = value
  return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return tree


def _as_tuple(x) -> tuple:
  return x if isinstance(x, tuple) else (x,)


def expected_torch_shapes(entry: Entry, jax_shape: Sequence[int]) -> tuple[tuple[int, ...], ...] | None:
  """The PyTorch tensor shapes `entry` turns into a JAX array of `jax_shape` (one layer's, for stacked entries),
  from its inverse applied to a 1-byte stand-in; None when the inverse cannot run on one."""
  probe = np.broadcast_to(np.zeros((), np.int8), tuple(int(d) for d in jax_shape))
  try:
    return tuple(tuple(np.shape(t)) for t in _as_tuple(entry.to_torch(probe)))
  except Exception:  # noqa: BLE001 - a transform that needs real values: the shape is checked after it runs
    return None


def check_torch_shapes(entry: Entry, names: Sequence[str], tensors: Sequence[np.ndarray],
                       jax_shape: Sequence[int] | None, what: str,
                       file_of: Callable[[str], str] | None = None) -> None:
  """Before `entry.to_jax` reshapes anything: each tensor has the shape the model needs, else a ValueError
  naming the tensor, its file, the shape expected and the shape found."""
  if jax_shape is None:
    return
  expected = expected_torch_shapes(entry, jax_shape)
  if expected is None:
    return
  for name, tensor, want in zip(names, tensors, expected):
    if tuple(np.shape(tensor)) != want:
      where = f" in {file_of(name)}" if file_of is not None else ""
      raise ValueError(f"{what}: tensor {name!r}{where} has shape {tuple(np.shape(tensor))}, expected {want} "
                       f"for {entry.jax_path} {tuple(jax_shape)} (wrong architecture or size?)")


def torch_name_groups(entry: Entry, num_layers: int) -> list[tuple[str, ...]]:
  """The torch names an entry reads: one group per layer (`{i}` filled in) when stacked, else its own names."""
  if not entry.stacked:
    return [entry.torch_names]
  return [tuple(n.format(i=i) for n in entry.torch_names) for i in range(num_layers)]


def claim_tensors(names: tuple[str, ...], tensors: Mapping, entry: Entry, claimed: set[str], what: str) -> None:
  """Marks `names` as read for `entry`; a name `tensors` lacks is a KeyError naming it and the entry."""
  missing = [n for n in names if n not in tensors]
  if missing:
    raise KeyError(f"{what}: tensor {missing[0]!r} (for {entry.jax_path}) is missing")
  claimed.update(names)


def import_params(entries: Iterable[Entry], state_dict: Mapping[str, np.ndarray], num_layers: int = 0,
                  expected: Mapping[str, tuple[int, ...]] | None = None, what: str = "checkpoint",
                  allow_unused: Iterable[str] = ()) -> tuple[dict, dict]:
  """PyTorch state dict → flat JAX params `{path: array}` plus a report `{mapped, unused}`.

  `expected` (path → shape, e.g. from `jax.eval_shape` of the module) makes every shape checked; the first
  mismatch raises with both names. `allow_unused` holds regexes of PyTorch names that may be left unmapped
  (e.g. rotary caches); any other unclaimed tensor is an error.
  """
  flat: dict[str, np.ndarray] = {}
  claimed: set[str] = set()
  for entry in entries:
    groups = torch_name_groups(entry, num_layers)
    values = []
    for names in groups:
      claim_tensors(names, state_dict, entry, claimed, what)
      tensors = [np.asarray(state_dict[n]) for n in names]
      if expected is not None and entry.jax_path in expected:
        want_shape = tuple(expected[entry.jax_path])
        check_torch_shapes(entry, names, tensors, want_shape[1:] if entry.stacked else want_shape, what)
      value = np.asarray(entry.to_jax(*tensors))
      if values and value.shape != values[0].shape:
        raise ValueError(f"{what}: tensor {names[0]!r} → {entry.jax_path} has shape {value.shape}, the other "
                         f"layers have {values[0].shape}")
      if entry.stacked and expected is not None and entry.jax_path in expected:
        want_layer = tuple(expected[entry.jax_path])[1:]
        if value.shape != want_layer:
          raise ValueError(f"{what}: tensor {names[0]!r} → {entry.jax_path} has shape {value.shape}, the model "
                           f"expects {want_layer} per layer (wrong architecture or size?)")
      values.append(value)
    value = np.stack(values) if entry.stacked else values[0]
    if expected is not None:
      if entry.jax_path not in expected:
        raise KeyError(f"{what}: table entry {entry.jax_path!r} is not a parameter of the target model")
      want = tuple(expected[entry.jax_path])
      if tuple(value.shape) != want:
        raise ValueError(f"{what}: tensor {groups[0][0]!r} → {entry.jax_path} has shape {tuple(value.shape)}, "
                         f"the model expects {want} (wrong architecture or size?)")
    flat[entry.jax_path] = value
  allowed = [re.compile(p) for p in allow_unused]
  unused = sorted(n for n in state_dict if n not in claimed and not any(p.fullmatch(n) for p in allowed))
  if unused:
    raise KeyError(f"{what}: {len(unused)} tensors are not mapped by the table, first {unused[0]!r}")
  if expected is not None:
    absent = sorted(set(expected) - set(flat))
    if absent:
      raise KeyError(f"{what}: model parameter {absent[0]!r} has no entry in the table ({len(absent)} absent)")
  return flat, {"mapped": sorted(claimed), "unused_allowed": sorted(set(state_dict) - claimed)}


def export_params(entries: Iterable[Entry], flat_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat JAX params → PyTorch state dict (numpy arrays); every entry's parameter must exist."""
  out: dict[str, np.ndarray] = {}
  for entry in entries:
    if entry.jax_path not in flat_params:
      raise KeyError(f"export: parameter {entry.jax_path!r} is missing from the JAX params")
    value = np.asarray(flat_params[entry.jax_path])
    if entry.stacked:
      for i in range(value.shape[0]):
        for name, tensor in zip(entry.torch_names, _as_tuple(entry.to_torch(value[i]))):
          out[name.format(i=i)] = np.asarray(tensor)
    else:
      for name, tensor in zip(entry.torch_names, _as_tuple(entry.to_torch(value))):
        out[name] = np.asarray(tensor)
  return out
