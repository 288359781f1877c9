"""scripts/train.py as people break it: two trainers on one workdir, a resume under a changed config, a disk that
fills up during a save. Each must leave every intact checkpoint in place and say what happened."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from test_train import (REPO, TOTAL_STEPS, assert_states_equal, committed_steps, load_state, reference_run,
                        shared_runner)
from unires_jax.train import run_lock

# With test_train.py on one xdist worker: they share its data set and reference run.
pytestmark = pytest.mark.xdist_group("train_runs")


@pytest.fixture(scope="module")
def runner(run_shared_dir):
  return shared_runner(run_shared_dir)


def _short_error(result: subprocess.CompletedProcess, quiet: bool = True) -> str:
  """The train.py error block (exit 2); with `quiet`, no traceback and no asyncio noise anywhere in stderr."""
  assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
  if quiet:
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-4000:]
  return result.stderr[result.stderr.index("train.py: error:"):]


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_workdir_is_refused_and_the_first_finishes(runner):
  reference = reference_run(runner)
  workdir = os.path.join(runner.root, "busy")
  shutil.rmtree(workdir, ignore_errors=True)
  log_path = workdir + "_first.log"
  with open(log_path, "w") as log:
    first = subprocess.Popen(runner.command(workdir), env=runner.env(), cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 400
    while not committed_steps(workdir) and first.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert committed_steps(workdir) and first.poll() is None, open(log_path).read()[-3000:]
    second = runner.run(workdir, check=False, timeout=300)
    first.wait(timeout=400)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  error = _short_error(second)
  assert f"is in use by pid {first.pid} on host" in error and "use another --workdir" in error
  assert first.returncode == 0, open(log_path).read()[-3000:]
  assert_states_equal(load_state(reference, TOTAL_STEPS), load_state(workdir, TOTAL_STEPS))
  assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_FILE))


@pytest.mark.slow
def test_resuming_under_a_changed_model_config_stops_and_moves_nothing(runner):
  reference = reference_run(runner)
  workdir = os.path.join(runner.root, "changed_config")
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(os.path.join(reference, "checkpoints"), os.path.join(workdir, "checkpoints"))
  steps = committed_steps(workdir)
  result = runner.run(workdir, "--config.model.llm.mlp_dim=96", check=False, timeout=300)
  error = _short_error(result)
  assert f"checkpoint step {TOTAL_STEPS} in" in error and "does not fit this config's model" in error
  assert "params/llm/layers/mlp/down_proj/kernel: checkpoint shape (4, 256, 128), the model expects (4, 96, 128)" in error
  assert committed_steps(workdir) == steps
  assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))


def _tree_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_a_restart_after_freeing_space_resumes(runner):
  """The workdir on a 64 MB tmpfs: once step 3 is saved, a filler file leaves half a checkpoint free, so the
  save at step 6 runs out of space."""
  reference = reference_run(runner)
  checkpoint_bytes = _tree_bytes(os.path.join(reference, "checkpoints", "6"))
  workdir = os.path.join(runner.root, "disk_full")
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", workdir], capture_output=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
  filler = os.path.join(workdir, "filler")
  try:
    process = subprocess.Popen(runner.command(workdir), env=runner.env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while 3 not in committed_steps(workdir) and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    statvfs = os.statvfs(workdir)
    with open(filler, "wb") as f:
      f.write(b"\0" * max(0, statvfs.f_bavail * statvfs.f_frsize - checkpoint_bytes // 2))
    _, stderr = process.communicate(timeout=400)
    full = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    error = _short_error(full, quiet=False)  # Orbax logs the failed write with its own traceback
    assert "no space left on device" in error and "newest intact checkpoint is step 3" in error, error
    assert committed_steps(workdir)[-1] == 3  # (Orbax also keeps its first save, step 1, until step 8)

    os.remove(filler)  # space freed
    resumed = runner.run(workdir)
    assert "resuming at step 3" in resumed.stderr
    assert_states_equal(load_state(reference, TOTAL_STEPS), load_state(workdir, TOTAL_STEPS))
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
    subprocess.run(["umount", "-l", workdir], check=False)
