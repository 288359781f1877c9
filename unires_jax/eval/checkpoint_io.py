"""Loads a training run for inference: its config (config.json) and the params of one Orbax step, nothing else.

Only the `params` subtree of the saved train state is read (an Orbax partial restore), so the optimizer state never
reaches host memory. Data locations in the run's config (the toy tokenizer, prepared splits) are found again when
the workdir was moved: a path that no longer exists is looked up under the workdir by its trailing components.
LoRA factors, when the run trained them, are merged into their kernels.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from unires_jax.convert import checkpoints as checkpoints_lib
from unires_jax.data import pipeline
from unires_jax.models import lora as lora_lib
from unires_jax import checkpointing


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
  """A run's config (data paths resolved, `data.tokenizer_path` set) and its params (numpy, LoRA merged)."""
  config: ml_collections.ConfigDict
  params: dict
  workdir: str
  step: int | None
  item_dir: str


def restore_params(item_dir: str) -> dict:
  """The params of an Orbax item as numpy arrays (the optimizer state is never read; see
  `unires_jax.checkpointing.restore_params`)."""
  return checkpointing.restore_params(item_dir)


def rebase_path(path: str, workdir: str, exists: Callable[[str], bool] = os.path.exists) -> str:
  """`path` if it exists; else the first existing `workdir/<trailing components of path>` (longest first), so a
  moved run finds its own files; else `path` unchanged (the caller reports it)."""
  if not path or exists(path):
    return path
  parts = [p for p in os.path.normpath(path).split(os.sep) if p]
  for start in range(len(parts)):
    candidate = os.path.join(workdir, *parts[start:])
    if exists(candidate):
      return candidate
  return path


def resolve_tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The run's tokenizer model file (`pipeline.tokenizer_model_path`), also looked up under `workdir`. Never trains
  a new one: a tokenizer other than the run's would give the model different ids."""
  expected = pipeline.tokenizer_model_path(config)
  found = rebase_path(expected, workdir)
  if os.path.isfile(found):
    return found
  raise FileNotFoundError(f"tokenizer of the run in {workdir!r} not found: looked for {expected!r} (from "
                          f"data.tokenizer_path / data.toy_tokenizer_prefix / data.sources in its config.json) and for "
                          f"its trailing components under the workdir")


def resolve_run_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of the run config with its tokenizer resolved into `data.tokenizer_path` and its data locations
  (data.sources, each `evals[name].data_dir`) rebased onto `workdir` where they moved."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.data.tokenizer_path = resolve_tokenizer_path(config, workdir)
  resolved.data.sources = [dict(s, dir=rebase_path(s["dir"], workdir)) for s in config.data.get("sources", [])]
  for name, eval_cfg in config.get("evals", {}).items():
    if eval_cfg.get("data_dir", ""):
      resolved.evals[name].data_dir = rebase_path(eval_cfg.data_dir, workdir)
  return resolved


def merge_lora_params(params: dict, config: ml_collections.ConfigDict) -> dict:
  """Params with the run's LoRA factors (if any) merged into their kernels, as numpy."""
  if lora_lib.LORA_KEY not in params:
    return params
  lora_cfg = config.get("train", {}).get("lora", None)
  if lora_cfg is None:
    raise ValueError(f"params hold a {lora_lib.LORA_KEY!r} subtree but the run config has no train.lora section "
                     f"(expected alpha and rank to merge it)")
  merged = lora_lib.merge_lora(params, float(lora_cfg.alpha), int(lora_cfg.rank))
  return jax.tree.map(np.asarray, merged)


def load_checkpoint(path: str, step: int | None = None) -> LoadedCheckpoint:
  """Loads a run workdir, its `checkpoints/` folder or one `checkpoints/<step>/` folder (newest step unless
  `step`); the run's config.json must lie in the workdir."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist (expected a training workdir, its checkpoints/ "
                            f"folder or a checkpoints/<step>/ folder)")
  item_dir, run_dir = checkpoints_lib.resolve_params_dir(path, step)
  if run_dir is None:
    raise FileNotFoundError(f"checkpoint {path!r}: no {checkpoints_lib.CONFIG_FILE} found in its run directory "
                            f"(expected <workdir>/{checkpoints_lib.CONFIG_FILE} beside <workdir>/checkpoints/)")
  step_name = os.path.basename(os.path.dirname(item_dir))
  config = checkpoints_lib.load_run_config(run_dir)
  config = resolve_run_paths(config, run_dir)
  try:
    params = restore_params(item_dir)
  except checkpointing.CheckpointUnreadableError as error:
    raise checkpointing.CheckpointUnreadableError(f"{error}{checkpoints_lib.earlier_steps_hint(item_dir)}") from error
  params = merge_lora_params(params, config)
  return LoadedCheckpoint(config=config, params=params, workdir=run_dir,
                          step=int(step_name) if step_name.isdigit() else None, item_dir=item_dir)
