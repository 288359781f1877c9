"""End-to-end training runs of scripts/train.py in subprocesses: exact resume after SIGKILL, fallback from a
corrupted latest checkpoint, and config errors that stop before any work.

Every run shares one generated toy data set and one persistent compilation cache, so only the first run pays
for data generation and compilation (the shared machine has few cores)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

# The training runs share one data set and reference run: one xdist worker runs them all, one after another.
pytestmark = pytest.mark.xdist_group("train_runs")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRAIN_SCRIPT = os.path.join(REPO, "scripts", "train.py")
TOTAL_STEPS = 8  # checkpoints every 3 steps (configs/toy.py:quick) and at the end: steps 3, 6, 8
# One process's runs use 2 CPU devices: a state sharded over a mesh, saved and restored, at less than the cost of the
# suite's 8 (a warm-cache run of the test config took 20 s on 2 devices and 29 s on 8, 2026-12-06, 2 cores).
RUN_DEVICES = 2

# configs/toy.py:quick with the data in a shared directory (argument) instead of each workdir, and no
# evaluation (it is not what these tests check, and it costs a compilation per run).
TEST_CONFIG = '''
import ml_collections
from configs import toy


def _swap(node, old, new):
  if isinstance(node, dict):
    return {k: _swap(v, old, new) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return type(node)(_swap(v, old, new) for v in node)
  return node.replace(old, new) if isinstance(node, str) else node


def get_config(data_dir):
  config = toy.get_config("quick").to_dict()
  config["evals"] = {}
  # Adam's epsilon at 1e-4 instead of 1e-8: parameters with round-off-sized gradients are not driven by them, so
  # runs whose reductions sum in another order (several processes) stay comparable to 1e-6.
  config["optim"]["eps"] = 1e-4
  return ml_collections.ConfigDict(_swap(config, "{workdir}", data_dir))
'''


class TrainRunner:
  """Builds `scripts/train.py` command lines and environments around one shared data set; the runs use the test
run's persistent compilation cache (conftest.py), which every test process shares."""

  def __init__(self, root: str):
    self.root = root
    self.config_path = os.path.join(root, "train_test_config.py")
    self.data_dir = os.path.join(root, "data")
    with open(self.config_path, "w") as f:
      f.write(TEST_CONFIG)

  def env(self, device_count: int | None = RUN_DEVICES) -> dict[str, str]:
    env = dict(os.environ)
    # conftest.py's XLA flags without its device count, which each run sets itself (or leaves to --cpu_devices).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if device_count:
      flags.append(f"--xla_force_host_platform_device_count={device_count}")
    # No YNNPACK fusions in any run: a program over several processes does not get them (its states equal a
    # one-process run without them to 2.8e-6 of a tensor's norm, and differ from one with them by 1.6e-3, after 8
    # steps), so one-process references compile the same kernels as the two-process run they are compared with.
    flags.append("--xla_cpu_experimental_ynn_fusion_type=")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env

  def command(self, workdir: str, *overrides: str, data_dir: str | None = None) -> list[str]:
    return [sys.executable, TRAIN_SCRIPT, f"--config={self.config_path}:{data_dir or self.data_dir}",
            f"--workdir={workdir}", f"--config.train.total_steps={TOTAL_STEPS}", *overrides]

  def run(self, workdir: str, *overrides: str, data_dir: str | None = None, check: bool = True,
          timeout: float = 500) -> subprocess.CompletedProcess:
    result = subprocess.run(self.command(workdir, *overrides, data_dir=data_dir), env=self.env(), cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
      raise AssertionError(f"train.py in {workdir} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def committed_steps(workdir: str) -> list[int]:
  """Finalised checkpoint steps (Orbax writes to a temporary name and renames when complete)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load_state(workdir: str, step: int) -> dict:
  """The saved train state at `step` as numpy arrays, independent of the mesh it was saved from."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_states_equal(expected: dict, actual: dict, rtol: float = 0.0) -> None:
  """Every leaf of the train state (params, optimizer moments, step) matches; names the first that differs.

  rtol 0 asks for bit-equal leaves. Otherwise each leaf's error is measured as a whole tensor,
  ||actual - expected|| <= rtol * ||expected|| (Frobenius norms), so that round-off in an element that is small
  beside its tensor's other elements is not mistaken for a wrong value, while a wrong split or a missing
  reduction, which changes a tensor by its own size, still fails.
  """
  expected_leaves = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  actual_leaves = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
  assert expected_leaves.keys() == actual_leaves.keys()
  for path, value in expected_leaves.items():
    other = actual_leaves[path]
    name = jax.tree_util.keystr(path)
    if rtol:
      value, other = np.asarray(value, np.float64), np.asarray(other, np.float64)
      error, scale = float(np.linalg.norm(other - value)), float(np.linalg.norm(value))
      assert error <= rtol * scale, f"{name}: ||Δ|| {error:.3g} > {rtol} * ||expected|| {scale:.3g}"
    else:
      assert np.array_equal(value, other), f"{name} differs: max |Δ| {np.max(np.abs(value - other))}"


def reference_run(runner: TrainRunner) -> str:
  """The uninterrupted run (one process, `RUN_DEVICES` devices): run once per test run, by the first process to ask,
  under a file lock that the others wait on."""
  workdir = os.path.join(runner.root, "reference")
  with open(os.path.join(runner.root, "reference.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the run fails
    if not os.path.exists(os.path.join(workdir, "train_summary.json")):
      shutil.rmtree(workdir, ignore_errors=True)
      runner.run(workdir)
  return workdir


def shared_runner(run_shared_dir) -> TrainRunner:
  """One runner root per test run (conftest.py's `run_shared_dir`), so the training test modules of every worker
  share the data and the reference run."""
  root = run_shared_dir / "train_runs"
  root.mkdir(exist_ok=True)
  return TrainRunner(str(root))


@pytest.fixture(scope="module")
def runner(run_shared_dir) -> TrainRunner:
  return shared_runner(run_shared_dir)


def signal_after_first_checkpoint(runner: TrainRunner, workdir: str, signum: int) -> tuple[subprocess.Popen, str]:
  """Starts a run, sends `signum` once its first checkpoint is committed, waits for it to end."""
  log_path = workdir + "_first.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(runner.command(workdir), env=runner.env(), cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 400
    while not committed_steps(workdir) and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert committed_steps(workdir), f"no checkpoint was written before the signal; log in {log_path}"
    process.send_signal(signum)
    process.wait(timeout=300)
  finally:
    if process.poll() is None:
      process.kill()
    process.wait()
  return process, log_path


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(runner):
  reference = reference_run(runner)
  assert committed_steps(reference) == [6, TOTAL_STEPS]  # keep_last=2

  workdir = os.path.join(runner.root, "killed")
  process, _ = signal_after_first_checkpoint(runner, workdir, signal.SIGKILL)
  assert process.returncode == -signal.SIGKILL
  steps_at_kill = committed_steps(workdir)
  assert steps_at_kill and steps_at_kill[-1] < TOTAL_STEPS, steps_at_kill

  resumed = runner.run(workdir)
  assert f"resuming at step {steps_at_kill[-1]}" in resumed.stderr
  assert_states_equal(load_state(reference, TOTAL_STEPS), load_state(workdir, TOTAL_STEPS))
  # The comparison can fail: two steps of training change the parameters.
  earlier, final = load_state(reference, 6), load_state(reference, TOTAL_STEPS)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(earlier["params"]),
                                                     jax.tree.leaves(final["params"])))


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_to_previous(runner):
  reference = reference_run(runner)
  workdir = os.path.join(runner.root, "corrupted")
  shutil.copytree(os.path.join(reference, "checkpoints"), os.path.join(workdir, "checkpoints"))
  # Garble every array chunk of the latest step's state.
  chunk_dir = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "state", "ocdbt.process_0", "d")
  chunks = os.listdir(chunk_dir)
  assert chunks
  for name in chunks:
    with open(os.path.join(chunk_dir, name), "r+b") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(0)
      f.write(b"\xff" * size)

  resumed = runner.run(workdir)
  assert f"checkpoint at step {TOTAL_STEPS} in" in resumed.stderr
  assert "cannot be restored" in resumed.stderr
  assert "resuming at step 6" in resumed.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", str(TOTAL_STEPS)))
  assert_states_equal(load_state(reference, TOTAL_STEPS), load_state(workdir, TOTAL_STEPS))


def _assert_stops_before_work(result: subprocess.CompletedProcess, workdir: str, *fragments: str) -> None:
  assert result.returncode != 0
  for fragment in fragments:
    assert fragment in result.stderr, f"{fragment!r} not in the error output:\n{result.stderr[-3000:]}"
  assert not committed_steps(workdir)
  assert "train step compiled" not in result.stderr


@pytest.mark.slow
def test_unknown_config_key_names_it(runner, tmp_path):
  workdir = str(tmp_path / "unknown_key")
  result = runner.run(workdir, "--config.train.bogus=1", check=False, timeout=120)
  _assert_stops_before_work(result, workdir, "bogus")
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_batch_size_not_dividing_mesh_names_it(runner, tmp_path):
  workdir = str(tmp_path / "bad_batch")
  result = runner.run(workdir, "--config.data.batch_size=3", check=False, timeout=300)  # the mesh has 2 devices
  _assert_stops_before_work(result, workdir, "data.batch_size", "3")


@pytest.mark.slow
def test_missing_data_path_names_it(runner, tmp_path):
  workdir = str(tmp_path / "missing_data")
  missing = str(tmp_path / "nowhere")
  result = runner.run(workdir, f"--config.data.sources[0].dir={missing}/train",
                      check=False, timeout=300)
  _assert_stops_before_work(result, workdir, "data.sources", f"{missing}/train")


@pytest.mark.slow
def test_sigterm_saves_then_exits_and_the_run_resumes_exactly(runner):
  """Preemption: SIGTERM mid-run saves a checkpoint at the current step and exits cleanly; the resumed run ends
  where an uninterrupted one does."""
  reference = reference_run(runner)
  workdir = os.path.join(runner.root, "preempted")
  process, log_path = signal_after_first_checkpoint(runner, workdir, signal.SIGTERM)
  text = open(log_path).read()
  assert process.returncode == 0, text[-3000:]
  marker = "SIGTERM received: saving a checkpoint at step "
  assert marker in text, text[-3000:]
  saved_step = int(text.split(marker)[1].split()[0])
  assert saved_step < TOTAL_STEPS and saved_step in committed_steps(workdir)

  resumed = runner.run(workdir)
  assert f"resuming at step {saved_step}" in resumed.stderr
  assert_states_equal(load_state(reference, TOTAL_STEPS), load_state(workdir, TOTAL_STEPS))
