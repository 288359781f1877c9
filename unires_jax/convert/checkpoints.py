"""Checkpoints in and out: read a training run's params and config, stream PyTorch weights into sharded params.

A run directory holds `config.json` and Orbax steps `checkpoints/<step>/state` (a TrainState with `params`);
`scripts/import_pretrained.py` writes `params/` (the params tree alone) beside its `config.json`. Both load with
`load_params`. `stream_import` reads a safetensors file tensor by tensor (`safe_open`), converts each through its
table entry and places it straight into its sharding, so the host never holds a second full copy of the model.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unires_jax.convert import mapping
from unires_jax.convert.common import tensor_to_numpy

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def load_run_config(directory: str) -> ml_collections.ConfigDict:
  """The `config.json` a run (or an import) wrote into `directory`."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"run config {path!r} does not exist (expected the run's workdir)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _latest_step(checkpoints_dir: str) -> str:
  steps = [int(n) for n in os.listdir(checkpoints_dir) if n.isdigit()]
  if not steps:
    raise FileNotFoundError(f"no Orbax step directory (checkpoints/<step>) in {checkpoints_dir!r}")
  return os.path.join(checkpoints_dir, str(max(steps)))


def resolve_params_dir(path: str, step: int | None = None) -> tuple[str, str | None]:
  """(Orbax item directory holding the params, directory of the run config or None).

  Accepts a run workdir, its `checkpoints/` folder, one `checkpoints/<step>/` folder, or an import's output.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    return os.path.join(path, PARAMS_DIR), path if os.path.exists(os.path.join(path, CONFIG_FILE)) else None
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return resolve_params_dir(os.path.join(path, "checkpoints"), step)
  if os.path.isdir(os.path.join(path, "state")):
    run = os.path.dirname(os.path.dirname(path))
    return os.path.join(path, "state"), run if os.path.exists(os.path.join(run, CONFIG_FILE)) else None
  if os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path)):
    step_dir = os.path.join(path, str(step)) if step is not None else _latest_step(path)
    if not os.path.isdir(step_dir):
      raise FileNotFoundError(f"checkpoint step {step} does not exist in {path!r}")
    return resolve_params_dir(step_dir)
  raise FileNotFoundError(f"{path!r} is neither a run workdir, a checkpoints folder, a step folder nor an import "
                          f"output (expected checkpoints/<step>/state or {PARAMS_DIR}/)")


def load_params(path: str, step: int | None = None) -> tuple[dict, ml_collections.ConfigDict | None]:
  """(params as a nested dict of numpy arrays, run config or None) from a training run or an import.

  For a train state only `params` is read (a partial restore: the optimizer and data-iterator states are never
  loaded); a `lora` key, if the run trained LoRA factors, is kept. A step whose files are missing or damaged is a
  `CheckpointUnreadableError` naming it and the readable steps before it.
  """
  from unires_jax import checkpointing

  item_dir, run_dir = resolve_params_dir(path, step)
  try:
    params = checkpointing.restore_params(item_dir)
  except checkpointing.CheckpointUnreadableError as error:
    raise checkpointing.CheckpointUnreadableError(f"{error}{earlier_steps_hint(item_dir)}") from error
  config = load_run_config(run_dir) if run_dir else None
  return params, config


def earlier_steps_hint(item_dir: str) -> str:
  """"; readable earlier steps: ... (pass --step N)" for an item inside `checkpoints/<step>/state`, else ""."""
  from unires_jax import checkpointing

  step_dir = os.path.dirname(item_dir)
  if not os.path.basename(step_dir).isdigit():
    return ""
  step = int(os.path.basename(step_dir))
  earlier = [s for s in checkpointing.readable_steps(os.path.dirname(step_dir)) if s < step]
  if not earlier:
    return "; no earlier step of this run has its metadata"
  return f"; earlier steps with their metadata: {earlier} (use step {earlier[-1]}: --step {earlier[-1]})"


def save_params(directory: str, params: Any) -> str:
  """Writes the params tree as an Orbax checkpoint at `directory/params` (read back by `load_params`)."""
  target = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, params, force=True)
  checkpointer.wait_until_finished()
  return target


# --- reading PyTorch checkpoints --------------------------------------------------------------------------------------
def checkpoint_files(path: str) -> list[str]:
  """The weight files of a file or folder: `*.safetensors` first, else `*.bin` / `*.pt` / `*.pth`."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
    files = sorted(glob.glob(os.path.join(path, pattern)))
    if files:
      return files
  raise FileNotFoundError(f"checkpoint folder {path!r} holds no *.safetensors, *.bin, *.pt or *.pth file")


class NamedTensors(Mapping):
  """A Mapping name → numpy array whose names are the keys of `self._where` (name → the file that holds it);
  subclasses fill `_where` and read a tensor in `__getitem__`."""
  _where: dict[str, str]

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, name: object) -> bool:
    return name in self._where


class TensorReader(NamedTensors):
  """Name → numpy array over one or several weight files, read lazily one tensor at a time.

  Safetensors files are opened with `safe_open` (memory-mapped); `.bin` files are read with
  `torch.load(weights_only=True, mmap=True)`, which also maps tensors rather than copying them.
  """

  def __init__(self, path: str):
    self.files = checkpoint_files(path)
    self._handles: dict[str, Any] = {}
    self._where: dict[str, str] = {}
    for file in self.files:
      for name in self._open(file).keys():
        self._where[name] = file

  def _open(self, file: str):
    if file not in self._handles:
      if file.endswith(".safetensors"):
        from safetensors import safe_open
        self._handles[file] = safe_open(file, framework="pt" if _has_torch() else "numpy")
      else:
        self._handles[file] = _torch_load(file)
    return self._handles[file]

  def file_of(self, name: str) -> str:
    return self._where[name]

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._where[name]
    handle = self._open(file)
    value = handle.get_tensor(name) if file.endswith(".safetensors") else handle[name]
    return tensor_to_numpy(value)


def _torch_load(file: str) -> Mapping:
  """A `torch.save` state dict, memory-mapped; a file that is not one is a ValueError naming it."""
  import pickle
  import zipfile

  import torch

  if not zipfile.is_zipfile(file):
    with open(file, "rb") as f:
      head = f.read(2)
    kind = "a plain Python pickle" if head[:1] == b"\x80" else "not a zip archive"
    raise ValueError(f"weights file {file} is not a torch checkpoint: torch.save writes a zip archive, this file is "
                     f"{kind} (convert it with torch.save, or use safetensors)")
  try:
    loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ValueError(f"weights file {file} was refused: {first} (only tensors and plain containers are loaded; "
                     f"nothing in the file is run)") from error
  if not isinstance(loaded, Mapping):
    raise ValueError(f"weights file {file} holds a {type(loaded).__name__}, expected a state dict of tensors")
  return loaded


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


class RenamedReader(Mapping):
  """A view of a reader with a name prefix removed (`strip`) and/or added (`add`); other names are hidden."""

  def __init__(self, reader: Mapping, strip: str = "", add: str = ""):
    self.reader = reader
    self.names = {add + n[len(strip):]: n for n in reader if n.startswith(strip)}

  def __getitem__(self, name):
    return self.reader[self.names[name]]

  def __iter__(self):
    return iter(self.names)

  def __len__(self):
    return len(self.names)

  def __contains__(self, name: object) -> bool:
    return name in self.names

  def file_of(self, name: str) -> str:
    file_of = getattr(self.reader, "file_of", None)
    return file_of(self.names[name]) if file_of is not None else ""


def stream_import(entries: Iterable[mapping.Entry], reader: Mapping[str, np.ndarray], num_layers: int,
                  abstract: Mapping[str, Any], shardings: Mapping[str, Any] | None, what: str,
                  allow_unused: Iterable[str] = ()) -> tuple[dict[str, jax.Array], list[dict]]:
  """Converts the tensors `entries` claim from `reader`, one parameter at a time, into arrays placed in
  `shardings[path]` with `abstract[path]`'s shape and dtype. Returns `({path: array}, report rows)`.

  Strict like `mapping.import_params`: a missing tensor, a shape the model does not have (named), or a tensor no
  entry claims (unless it matches `allow_unused`) is an error.
  """
  out: dict[str, jax.Array] = {}
  rows = []
  claimed: set[str] = set()
  for entry in entries:
    if entry.jax_path not in abstract:
      raise KeyError(f"{what}: table entry {entry.jax_path!r} is not a parameter of the target model")
    want = abstract[entry.jax_path]
    groups = mapping.torch_name_groups(entry, num_layers)
    layers = []
    for names in groups:
      mapping.claim_tensors(names, reader, entry, claimed, what)
      want_shape = tuple(want.shape[1:]) if entry.stacked else tuple(want.shape)
      tensors = [reader[n] for n in names]
      mapping.check_torch_shapes(entry, names, tensors, want_shape, what, getattr(reader, "file_of", None))
      layer = np.asarray(entry.to_jax(*tensors))
      del tensors
      if tuple(layer.shape) != want_shape:
        raise ValueError(f"{what}: tensor {names[0]!r} → {entry.jax_path} has shape {tuple(layer.shape)}, the "
                         f"model expects {want_shape} (wrong architecture or size?)")
      layers.append(layer)
    value = np.stack(layers) if entry.stacked else layers[0]
    del layers
    if tuple(value.shape) != tuple(want.shape):
      raise ValueError(f"{what}: {entry.jax_path} stacks {value.shape[0]} layers, the model expects "
                       f"{want.shape[0]} (wrong architecture or size?)")
    value = value.astype(want.dtype)
    out[entry.jax_path] = (jax.device_put(value, shardings[entry.jax_path]) if shardings is not None
                           else jax.numpy.asarray(value))
    rows.append({"param": entry.jax_path, "shape": list(value.shape), "source": what,
                 "tensors": [groups[0][0]] if len(groups) == 1 else [groups[0][0], groups[-1][0]]})
    del value
  allowed = [re.compile(p) for p in allow_unused]
  unused = sorted(n for n in reader if n not in claimed and not any(p.fullmatch(n) for p in allowed))
  if unused:
    raise KeyError(f"{what}: {len(unused)} tensors are not mapped by the table, first {unused[0]!r}")
  return out, rows


def config_from_file(spec: str) -> ml_collections.ConfigDict:
  """`configs/x.py` or `configs/x.py:arg` → `get_config(arg)` of that file."""
  import importlib.util

  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} has no get_config(arg) function")
  return module.get_config(arg or None)
