"""Orbax checkpointing of the train state with the Grain iterator state beside it.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when complete), so a
run killed mid-save leaves no half checkpoint behind. On restore the newest checkpoint that reads back is used;
a corrupted one (a missing or damaged file) is reported and the previous one is tried.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

log = logging.getLogger(__name__)


def preservation_policy(keep_last: int, keep_every_steps: int | None):
  policies = [managers.LatestN(n=int(keep_last))]
  if keep_every_steps:
    policies.append(managers.EveryNSteps(interval_steps=int(keep_every_steps)))
  return managers.AnyPreservationPolicy(policies) if len(policies) > 1 else policies[0]


class Checkpointer:
  """Saves `{state, data}` every `save_every` steps; restores the newest checkpoint that reads back."""

  def __init__(self, directory: str, save_every: int, keep_last: int = 3, keep_every_steps: int | None = None,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=int(save_every), enable_async_checkpointing=async_save,
        preservation_policy=preservation_policy(keep_last, keep_every_steps), cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, restoring `data_iterator` in place; None if none."""
    for step in reversed(self.all_steps()):
      try:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint means: try the previous one
        log.warning("checkpoint at step %d in %s cannot be restored (%s: %s); moving it aside and trying the "
                    "previous one", step, self.directory, type(error).__name__, (str(error).splitlines() or [""])[0][:200])
        self._set_aside(step)
        continue
      if jax.process_index() == 0:
        log.info("resumed from checkpoint step %d in %s", step, self.directory)
      return restored["state"], step
    return None

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's directory (kept for inspection, never reused)."""
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      target_dir = self.directory.rstrip("/") + "_unreadable"
      os.makedirs(target_dir, exist_ok=True)
      if os.path.exists(source):
        os.replace(source, os.path.join(target_dir, f"{step}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
