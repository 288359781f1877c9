"""Checkpoint restore sorts failures into unreadable / does not fit / anything else; saves fail loudly on a full
disk; exports read the parameters alone."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unires_jax.convert import checkpoints as convert_checkpoints
from unires_jax import checkpointing as checkpoint_lib
from unires_jax.checkpointing import Checkpointer
from unires_jax.train.state import TrainState

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def make_state(width: int = 4, extra: bool = False, seed: int = 0) -> TrainState:
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, width)), jnp.float32)},
            "bias": jnp.asarray(rng.normal(size=(width,)), jnp.float32)}
  if extra:
    params["new_head"] = jnp.zeros((2,), jnp.float32)
  return TrainState(step=jnp.asarray(0), params=params, opt_state=optax.adam(1e-3).init(params))


def abstract(state: TrainState):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def save_steps(directory: str, steps=(1, 2), state: TrainState | None = None) -> TrainState:
  state = state or make_state()
  checkpointer = Checkpointer(directory, save_every=1, keep_last=5, async_save=False)
  for step in steps:
    checkpointer.save(step, state.replace(step=jnp.asarray(step)), None, force=True)
  checkpointer.close()
  return state


def listing(directory: str) -> list[str]:
  return sorted(os.listdir(directory))


def test_listed_steps_are_saved_between_intervals_and_bad_ones_refused(tmp_path):
  state = make_state()
  checkpointer = Checkpointer(str(tmp_path / "ckpt"), save_every=100, keep_last=10, async_save=False,
                              save_on_steps=(4, 7))
  saved = [step for step in range(1, 11) if checkpointer.save(step, state, None, force=(step == 10))]
  checkpointer.close()
  assert saved == checkpointer.all_steps() == [1, 4, 7, 10]  # Orbax also keeps a run's first step
  for bad in ((0,), (2.5,), ("3",)):
    with pytest.raises(ValueError, match="train.checkpoint_steps must be positive integer steps"):
      Checkpointer(str(tmp_path / "bad"), save_every=1, save_on_steps=bad)


def test_unreadable_latest_step_is_set_aside_and_the_previous_one_restored(tmp_path):
  directory = str(tmp_path / "checkpoints")
  state = save_steps(directory)
  os.remove(os.path.join(directory, "2", "state", "_METADATA"))
  checkpointer = Checkpointer(directory, save_every=1, async_save=False)
  restored, step = checkpointer.restore_latest(abstract(state), None)
  checkpointer.close()
  assert step == 1 and int(restored.step) == 1
  np.testing.assert_array_equal(restored.params["bias"], state.params["bias"])
  assert listing(str(tmp_path / "checkpoints_unreadable")) == ["2"]


def test_a_changed_config_names_the_differing_leaves_and_moves_nothing(tmp_path):
  directory = str(tmp_path / "checkpoints")
  save_steps(directory)
  before = listing(directory)
  checkpointer = Checkpointer(directory, save_every=1, async_save=False)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as caught:
    checkpointer.restore_latest(abstract(make_state(width=5, extra=True)), None)
  checkpointer.close()
  message = str(caught.value)
  assert "step 2" in message and "does not fit" in message
  assert "params/dense/kernel: checkpoint shape (3, 4), the model expects (3, 5)" in message
  assert "params/new_head: in the model, not in the checkpoint" in message
  assert listing(directory) == before
  assert not os.path.exists(str(tmp_path / "checkpoints_unreadable"))


def test_another_failure_stops_and_moves_nothing(tmp_path, monkeypatch):
  """An I/O or memory error while reading (simulated: Orbax's restore raises it) is not a damaged checkpoint."""
  directory = str(tmp_path / "checkpoints")
  state = save_steps(directory)
  before = listing(directory)
  checkpointer = Checkpointer(directory, save_every=1, async_save=False)
  for error in (OSError(errno.EIO, "Input/output error"), MemoryError("out of memory allocating 12 GiB"),
                ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12884901888 bytes")):
    def failing_restore(*args, error=error, **kwargs):
      raise error
    monkeypatch.setattr(checkpointer.manager, "restore", failing_restore)
    with pytest.raises(checkpoint_lib.CheckpointRestoreError, match="nothing was moved"):
      checkpointer.restore_latest(abstract(state), None)
  checkpointer.close()
  assert listing(directory) == before
  assert not os.path.exists(str(tmp_path / "checkpoints_unreadable"))


def test_step_without_metadata_is_named_with_the_step_to_use(tmp_path):
  directory = str(tmp_path / "checkpoints")
  save_steps(directory)
  os.remove(os.path.join(directory, "2", "state", "_METADATA"))
  with pytest.raises(checkpoint_lib.CheckpointUnreadableError) as caught:
    convert_checkpoints.load_params(directory)
  message = str(caught.value)
  assert os.path.join(directory, "2", "state") in message and "_METADATA" in message
  assert "--step 1" in message
  params, _ = convert_checkpoints.load_params(directory, step=1)
  assert sorted(params) == ["bias", "dense"]


QUIET_EXIT_SCRIPT = textwrap.dedent('''
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import test_checkpoint as t
    from unires_jax import checkpointing as checkpoint_lib
    directory = {directory!r}
    t.save_steps(directory)
    checkpointer = checkpoint_lib.Checkpointer(directory, save_every=1)
    try:
      checkpointer.restore_latest(t.abstract(t.make_state(width=5)), None)
    except checkpoint_lib.CheckpointMismatchError:
      print("mismatch refused")
    t.damage_arrays(directory + "/2/state", b"params")
    print("restored step", checkpointer.restore_latest(t.abstract(t.make_state()), None)[1])
''')


def test_failed_restores_leave_no_event_loop_noise(tmp_path):
  """A refused and a failed Orbax restore in one process; its stderr holds no asyncio 'Event loop is closed'."""
  script = QUIET_EXIT_SCRIPT.format(repo=REPO, tests=os.path.dirname(__file__), directory=str(tmp_path / "ck"))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split("\n")[:2] == ["mismatch refused", "restored step 1"]
  assert "Event loop is closed" not in result.stderr
  assert "Traceback" not in result.stderr


def _closed_loop_unraisable() -> types.SimpleNamespace:
  """What Tensorstore hands `sys.unraisablehook` when a read finishes for an event loop that is already closed."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as error:
    return types.SimpleNamespace(exc_type=RuntimeError, exc_value=error, exc_traceback=error.__traceback__,
                                 err_msg=None, object=None)
  raise AssertionError("a closed event loop accepted a callback")


def _collect_suspended_coroutine(name: str) -> None:
  """Suspends a coroutine called `name` that answers its close with an exception, as Orbax's reads do, and drops it."""
  @types.coroutine
  def suspend():
    yield

  async def read():
    try:
      await suspend()
    except BaseException as error:
      raise Exception("a copy of the failure") from error

  read.__qualname__ = name
  coroutine = read()
  coroutine.send(None)
  del coroutine
  gc.collect()


def test_echoes_of_a_failed_restore_are_dropped_and_other_unraisables_pass(monkeypatch):
  reached_stderr = []
  monkeypatch.setattr(sys, "unraisablehook", reached_stderr.append)
  checkpoint_lib.quiet_abandoned_reads()
  checkpoint_lib.quiet_abandoned_reads()  # a second call adds no second layer
  _collect_suspended_coroutine(checkpoint_lib.ORBAX_READ_COROUTINE)
  sys.unraisablehook(_closed_loop_unraisable())
  assert reached_stderr == []
  _collect_suspended_coroutine("someone_elses_read")
  other_error = RuntimeError("Event loop is closed")  # same words, raised elsewhere: not an echo
  sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=other_error, exc_traceback=None,
                                           err_msg=None, object=None))
  assert [type(u.object).__name__ for u in reached_stderr] == ["coroutine", "NoneType"]
  assert reached_stderr[0].object.__qualname__ == "someone_elses_read"
  assert reached_stderr[1].exc_value is other_error


def damage_arrays(item_dir: str, prefix: bytes) -> int:
  """Overwrites the stored chunks of every array under `prefix` (e.g. b"opt_state") with bytes that do not
  decode; returns how many were damaged."""
  import tensorstore as ts
  store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item_dir}/"}).result()
  keys = [k for k in store.list().result() if k.startswith(prefix) and not k.endswith(b".zarray")]
  for key in keys:
    store.write(key, b"\x01damaged").result()
  return len(keys)


def test_export_reads_the_parameters_past_a_damaged_optimizer_state(tmp_path):
  directory = str(tmp_path / "checkpoints")
  state = save_steps(directory, steps=(1,))
  assert damage_arrays(os.path.join(directory, "1", "state"), b"opt_state") >= 5  # count, mu ×2, nu ×2
  params, _ = convert_checkpoints.load_params(directory)
  np.testing.assert_array_equal(params["dense"]["kernel"], state.params["dense"]["kernel"])
  assert sorted(params) == ["bias", "dense"]


def test_damaged_parameters_are_unreadable_and_named(tmp_path):
  directory = str(tmp_path / "checkpoints")
  save_steps(directory, steps=(1, 2))
  damage_arrays(os.path.join(directory, "2", "state"), b"params")
  with pytest.raises(checkpoint_lib.CheckpointUnreadableError, match=r"parameters cannot be read.*--step 1"):
    convert_checkpoints.load_params(directory)


PEAK_MEMORY_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    from unires_jax.convert import checkpoints
    import orbax.checkpoint  # everything imported before the baseline

    def status_kb(field):
      with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = status_kb("VmRSS")
    params, _ = checkpoints.load_params({path!r})
    print((status_kb("VmHWM") - before) * 1024, sum(v.nbytes for v in params.values()))
''')


@pytest.mark.slow
def test_export_reads_about_one_copy_of_the_parameters(tmp_path):
  """128 MB of parameters beside 256 MB of Adam moments: loading them for export grows the peak host memory by
  the parameters plus a bounded read buffer (two restore batches), not by the whole train state (3×)."""
  directory = str(tmp_path / "checkpoints")
  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.normal(size=(1024, 1024)), jnp.float32) for i in range(32)}
  state = TrainState(step=jnp.asarray(0), params=params, opt_state=optax.adam(1e-3).init(params))
  save_steps(directory, steps=(1,), state=state)
  del state, params
  result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT.format(repo=REPO, path=directory)],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
  grown, params_bytes = map(int, result.stdout.split()[-2:])
  assert params_bytes == 128 * 2**20
  limit = params_bytes + 2 * checkpoint_lib.RESTORE_BATCH_BYTES
  assert grown < limit, f"peak host memory grew by {grown / 2**20:.0f} MB for 128 MB of parameters"


@contextlib.contextmanager
def small_tmpfs(path: str, size: str):
  os.makedirs(path, exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", path], check=False)


def _tree_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def test_disk_full_keeps_the_previous_step_and_resumes_after_space_is_freed(tmp_path):
  """On a 4 MB tmpfs: the first checkpoint is saved, then a filler file leaves half a checkpoint free."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)}  # 256 KB (zero Adam moments compress)
  state = TrainState(step=jnp.asarray(0), params=params, opt_state=optax.adam(1e-3).init(params))
  with small_tmpfs(str(tmp_path / "disk"), "4m") as disk:
    directory = os.path.join(disk, "checkpoints")
    checkpointer = Checkpointer(directory, save_every=1, async_save=True)
    checkpointer.save(1, state.replace(step=jnp.asarray(1)), None, force=True)
    checkpointer.wait()
    checkpoint_bytes = _tree_bytes(os.path.join(directory, "1"))
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = os.path.join(disk, "filler")
    with open(filler, "wb") as f:
      f.write(b"\0" * (free - checkpoint_bytes // 2))
    with pytest.raises(checkpoint_lib.CheckpointSaveError) as caught:
      checkpointer.save(2, state.replace(step=jnp.asarray(2)), None, force=True)
      checkpointer.wait()
    message = str(caught.value)
    assert "no space left on device" in message and "newest intact checkpoint is step 1" in message
    checkpointer.manager.close()

    os.remove(filler)  # space freed: a restart resumes from step 1 and saves again
    restarted = Checkpointer(directory, save_every=1, async_save=True)
    restored, step = restarted.restore_latest(abstract(state), None)
    assert step == 1 and int(restored.step) == 1
    np.testing.assert_array_equal(restored.params["w"], params["w"])
    restarted.save(2, restored.replace(step=jnp.asarray(2)), None, force=True)
    restarted.close()
    assert restarted.all_steps() == [1, 2]
    assert not [n for n in os.listdir(directory) if "tmp" in n]
