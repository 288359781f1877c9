"""The run's checkpoints, for training, evaluation and export alike: Orbax saves of the train state with the Grain
iterator state beside it, and parameters-only restores.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when complete), so a
run killed mid-save leaves no half checkpoint behind. A save that fails (a full disk) stops the run with a
`CheckpointSaveError` naming the intact steps a restart resumes from.

On restore the newest checkpoint is tried first and a failure is sorted into one of three kinds:
- *unreadable* (missing or truncated files, bad metadata): the step is moved to `checkpoints_unreadable/` and the
  previous one is tried;
- *does not fit this config* (other parameter names or shapes): `CheckpointMismatchError` naming the differing
  leaves, nothing moved;
- *anything else* (I/O, memory): `CheckpointRestoreError`, nothing moved.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as managers

from unires_jax.errors import UserError

log = logging.getLogger(__name__)

STATE_ITEM = "state"
UNREADABLE_SUFFIX = "_unreadable"
# Tensorstore reports damaged or missing array files as ValueErrors whose message starts with a status code.
UNREADABLE_STATUS = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
MAX_NAMED_LEAVES = 8
RESTORE_BATCH_BYTES = 64 * 2**20  # parameters read per restore call by `restore_params`
# Orbax's per-array read coroutine: when one read of a restore fails, its siblings are left suspended.
ORBAX_READ_COROUTINE = "_read_array_index_and_device_put"


class CheckpointError(UserError):
  """A checkpoint that cannot be used, named with what is wrong and what to do."""


class CheckpointUnreadableError(CheckpointError):
  """Files of a step are missing or damaged."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint holds other parameters (names or shapes) than this config's model."""


class CheckpointRestoreError(CheckpointError):
  """Reading failed for another reason (I/O, memory); nothing was moved."""


class CheckpointSaveError(CheckpointError):
  """A save failed (e.g. no space left on device); earlier steps are intact."""


def _root_cause(error: BaseException) -> BaseException:
  """The innermost explicit cause (Orbax wraps Tensorstore's message in its own exception)."""
  seen = set()
  while error.__cause__ is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__
  return error


def _describe(error: BaseException, limit: int = 300) -> str:
  """`Type: first line` of the innermost cause."""
  cause = _root_cause(error)
  return f"{type(cause).__name__}: {((str(cause).splitlines() or [''])[0])[:limit]}"


def is_unreadable(error: BaseException) -> bool:
  """True for errors that mean "the files of this step are missing or damaged", also when wrapped (Orbax raises
  its own exception `from` the Tensorstore one)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if _is_unreadable_itself(error):
      return True
    seen.add(id(error))
    error = error.__cause__
  return False


def _is_unreadable_itself(error: BaseException) -> bool:
  if isinstance(error, CheckpointUnreadableError):
    return True
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError, EOFError)):
    return True
  if isinstance(error, KeyError) and "not found in the checkpoint" in str(error):
    return True  # an item (state, data) of the step is absent
  return isinstance(error, ValueError) and str(error).startswith(UNREADABLE_STATUS)


def is_disk_full(error: BaseException) -> bool:
  for candidate in (error, _root_cause(error)):
    if isinstance(candidate, OSError) and candidate.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(candidate) or "os_error_code='28'" in str(candidate):
      return True
  return False


def _is_abandoned_read_echo(unraisable) -> bool:
  """True for the two echoes of a failed Orbax restore that Python would print as unraisable tracebacks."""
  if getattr(unraisable.object, "__qualname__", "") == ORBAX_READ_COROUTINE:
    return True  # a sibling read closed when collected, raising its own copy of the failure
  error, trace = unraisable.exc_value, unraisable.exc_traceback
  if unraisable.object is None and isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    while trace is not None and trace.tb_next is not None:
      trace = trace.tb_next
    # Tensorstore finishing a read for the restore's event loop after Orbax has closed it.
    return trace is not None and trace.tb_frame.f_code.co_name == "_check_closed"
  return False


def quiet_abandoned_reads() -> None:
  """Called before a restore: from then on, echoes of a failed restore go to the debug log, not stderr (idempotent).

  When one array read of an Orbax restore fails, the other reads are abandoned: collected later, each raises its own
  copy of the failure, and Tensorstore reads still in flight report into the restore's closed event loop. Python
  prints both as tracebacks on stderr, at unpredictable times after the restore has returned. The failure itself is
  sorted and reported by the caller, so the echoes are logged at debug level; every other unraisable exception
  reaches the previous hook unchanged.
  """
  previous_hook = sys.unraisablehook
  if getattr(previous_hook, "quiets_abandoned_reads", False):
    return

  def hook(unraisable):
    if _is_abandoned_read_echo(unraisable):
      log.debug("echo of a failed restore: %r", unraisable.exc_value)
      return
    previous_hook(unraisable)

  hook.quiets_abandoned_reads = True
  sys.unraisablehook = hook


def read_tree_metadata(item_dir: str) -> dict[tuple[str, ...], Any]:
  """{leaf path: ArrayMetadata (shape, dtype)} of an Orbax item; `CheckpointUnreadableError` naming what is missing
  or damaged."""
  if not os.path.isdir(item_dir):
    raise CheckpointUnreadableError(f"checkpoint {item_dir}: the folder does not exist")
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(item_dir))
  except Exception as error:  # noqa: BLE001 - sorted below
    if is_unreadable(error):
      raise CheckpointUnreadableError(f"checkpoint {item_dir}: metadata cannot be read "
                                      f"({_describe(error)})") from error
    raise
  finally:
    handler.close()
  tree = getattr(metadata, "tree", None)
  if tree is None:
    raise CheckpointUnreadableError(f"checkpoint {item_dir}: its _METADATA holds no tree")
  return ocp.tree.to_flat_dict(tree)


def tree_differences(saved: dict[tuple[str, ...], Any], expected: dict[tuple[str, ...], Any]) -> list[str]:
  """Readable lines naming the leaves that are missing, extra or of another shape between two flat trees;
  parameters first (the optimizer state mirrors them)."""
  lines = []
  for path in sorted(set(saved) | set(expected), key=lambda p: (p[0] != "params", p)):
    name = "/".join(path)
    if path not in saved:
      lines.append(f"{name}: in the model, not in the checkpoint (shape {tuple(expected[path].shape)})")
    elif path not in expected:
      lines.append(f"{name}: in the checkpoint (shape {tuple(saved[path].shape)}), not in the model")
    elif tuple(saved[path].shape) != tuple(expected[path].shape):
      lines.append(f"{name}: checkpoint shape {tuple(saved[path].shape)}, the model expects "
                   f"{tuple(expected[path].shape)}")
  return lines


def _summarise(lines: list[str]) -> str:
  shown = "\n  ".join(lines[:MAX_NAMED_LEAVES])
  more = f"\n  ... and {len(lines) - MAX_NAMED_LEAVES} more" if len(lines) > MAX_NAMED_LEAVES else ""
  return f"  {shown}{more}"


def _batches_by_bytes(flat: dict[tuple[str, ...], Any], max_bytes: int) -> list[list[tuple[str, ...]]]:
  batches, current, size = [], [], 0
  for path, meta in flat.items():
    nbytes = int(np.prod(meta.shape, dtype=np.int64)) * np.dtype(meta.dtype).itemsize
    if current and size + nbytes > max_bytes:
      batches.append(current)
      current, size = [], 0
    current.append(path)
    size += nbytes
  return batches + ([current] if current else [])


def restore_params(item_dir: str, batch_bytes: int = RESTORE_BATCH_BYTES) -> dict:
  """The params of an Orbax item as host numpy arrays, and nothing else.

  For a train state (`step`, `params`, `opt_state`) only the `params` subtree is read (a partial restore), so a
  damaged optimizer file does not block it; a params-only item (`scripts/import_pretrained.py`) is read whole.
  Leaves are read in batches of about `batch_bytes`, so the host holds one copy of the parameters plus one
  batch's read buffers.
  """
  flat = read_tree_metadata(item_dir)
  is_state = {"params", "step"} <= {path[0] for path in flat}  # a TrainState, not an import's params tree
  wanted = {path[1:] if is_state else path: meta for path, meta in flat.items() if not is_state or path[0] == "params"}
  restored: dict[tuple[str, ...], np.ndarray] = {}
  quiet_abandoned_reads()
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    for batch in _batches_by_bytes(wanted, batch_bytes):
      target = ocp.tree.from_flat_dict({p: jax.ShapeDtypeStruct(wanted[p].shape, wanted[p].dtype) for p in batch})
      # Onto the host as numpy, whatever mesh wrote the checkpoint.
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
      if is_state:
        target, restore_args = {"params": target}, {"params": restore_args}
      values = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
      restored.update(ocp.tree.to_flat_dict(values["params"] if is_state else values))
  except Exception as error:  # noqa: BLE001 - sorted into the module's error kinds
    if is_unreadable(error):
      raise CheckpointUnreadableError(f"checkpoint {item_dir}: parameters cannot be read "
                                      f"({_describe(error)})") from error
    raise CheckpointRestoreError(f"checkpoint {item_dir}: reading the parameters failed "
                                 f"({_describe(error)})") from error
  finally:
    checkpointer.close()
  return ocp.tree.from_flat_dict(restored)


def preservation_policy(keep_last: int, keep_every_steps: int | None):
  policies = [managers.LatestN(n=int(keep_last))]
  if keep_every_steps:
    policies.append(managers.EveryNSteps(interval_steps=int(keep_every_steps)))
  return managers.AnyPreservationPolicy(policies) if len(policies) > 1 else policies[0]


class Checkpointer:
  """Saves `{state, data}` every `save_every` steps and at each of `save_on_steps`; restores the newest checkpoint
  that reads back."""

  def __init__(self, directory: str, save_every: int, keep_last: int = 3, keep_every_steps: int | None = None,
               async_save: bool = True, save_on_steps: tuple[int, ...] = ()):
    self.directory = os.path.abspath(directory)
    bad = [s for s in save_on_steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
      raise ValueError(f"train.checkpoint_steps must be positive integer steps; got {list(save_on_steps)!r}")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=int(save_every), save_on_steps=frozenset(save_on_steps),
        enable_async_checkpointing=async_save,
        preservation_policy=preservation_policy(keep_last, keep_every_steps), cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, "data"))

  def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
    """Starts a save of `step` (or skips it between intervals); a failure of this or the previous asynchronous
    save is a `CheckpointSaveError`."""
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    except Exception as error:  # noqa: BLE001 - any failure to write is reported the same way
      raise self._save_error(error, f"saving a step up to {step}") from error

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001
      raise self._save_error(error, "finishing the last save") from error

  def _save_error(self, error: BaseException, what: str) -> CheckpointSaveError:
    self.manager.reload()
    intact = self.all_steps()
    cause = "no space left on device" if is_disk_full(error) else _describe(error)
    resume = (f"the newest intact checkpoint is step {intact[-1]} (all intact: {intact}); free the cause and run "
              f"the same command again to resume from it" if intact else
              "no checkpoint of this run is intact yet; a restart begins at step 0")
    return CheckpointSaveError(f"checkpoint save failed in {self.directory} while {what}: {cause}. Training "
                               f"stopped; {resume}.")

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def check_fits(self, step: int, abstract_state: Any) -> None:
    """`CheckpointMismatchError` naming the leaves where step's saved state and `abstract_state` differ."""
    saved = read_tree_metadata(os.path.join(self.directory, str(step), STATE_ITEM))
    expected = ocp.tree.to_flat_dict(abstract_state)
    differences = tree_differences(saved, expected)
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not fit this config's model: {len(differences)} "
          f"leaves differ:\n{_summarise(differences)}\nNothing was changed. Train with the config that wrote it, "
          f"or start this config in another workdir.")

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, restoring `data_iterator` in place; None if none.

    Unreadable steps are set aside (newest first) until one reads; a mismatch with `abstract_state` or any other
    failure is raised with nothing moved.
    """
    quiet_abandoned_reads()  # a failed attempt's echoes may come at any time after it
    for step in reversed(self.all_steps()):
      try:
        self.check_fits(step, abstract_state)
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except CheckpointMismatchError:
        raise
      except Exception as error:  # noqa: BLE001 - sorted into the three kinds
        if not is_unreadable(error):
          raise CheckpointRestoreError(
              f"checkpoint step {step} in {self.directory} could not be restored ("
              f"{_describe(error)}). This is not a damaged checkpoint, so nothing was moved; fix the cause and "
              f"run again.") from error
        log.warning("checkpoint at step %d in %s cannot be restored (%s); moving it aside and trying the "
                    "previous one", step, self.directory, _describe(error, 200))
        self._set_aside(step)
        continue
      if jax.process_index() == 0:
        log.info("resumed from checkpoint step %d in %s", step, self.directory)
      return restored[STATE_ITEM], step
    return None

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's directory (kept for inspection, never reused)."""
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      target_dir = self.directory.rstrip("/") + UNREADABLE_SUFFIX
      os.makedirs(target_dir, exist_ok=True)
      if os.path.exists(source):
        os.replace(source, os.path.join(target_dir, f"{step}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def readable_steps(checkpoints_dir: str) -> list[int]:
  """Steps of a checkpoints folder whose state metadata is present (for "use --step N instead" messages)."""
  if not os.path.isdir(checkpoints_dir):
    return []
  steps = sorted(int(n) for n in os.listdir(checkpoints_dir) if n.isdigit())
  return [s for s in steps if os.path.isfile(os.path.join(checkpoints_dir, str(s), STATE_ITEM, "_METADATA"))]
