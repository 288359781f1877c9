"""Test-wide setup: 8 fake CPU devices, set before JAX initialises its backend; the toy run the checkpoint tests
share."""

import fcntl
import os
import shutil
import subprocess
import sys

import pytest

# The tests compile far more than they run (tiny models, a few steps): LLVM's optimisation passes take about a third
# of XLA:CPU's compile time, so the suite compiles at optimisation level 0. Results are unchanged (the toy training
# run's losses print the same to every digit at either level); benchmarks and the main job keep XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for every test process of a run (xdist workers and the subprocesses they start
# inherit it): the same tiny model compiled by several test modules is compiled once.
_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The repository root holds configs/ and scripts/, which tests import.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


LONG_GROUPS = ("train_runs", "trained_run")  # minutes of tests on one worker each: they start first


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
  """Scheduling for `-n 2` (pyproject.toml sets `--dist loadgroup`): the tests that read the `trained_run` checkpoint
  run on one worker (one trains it while the other would only wait on its lock), and so do the tests of a module
  that share a module-scoped fixture. The long groups and slow tests start first, so that no long test is left for
  the end while the other worker is idle."""
  for item in items:
    if "trained_run" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("trained_run"))
    elif item.get_closest_marker("xdist_group") is None and _uses_a_fixture_of_its_module(item):
      # A module-scoped fixture (a model, a checkpoint) is built once per worker that runs one of its tests: the
      # tests that share it go to one worker (test_init_from.py's fixture took 17-18 s on each of the two).
      item.add_marker(pytest.mark.xdist_group(f"{item.nodeid.split('::')[0]}:module_fixtures"))

  def start_order(item):
    group = item.get_closest_marker("xdist_group")
    return 0 if group and group.args[0] in LONG_GROUPS else 1 if item.get_closest_marker("slow") else 2

  items.sort(key=start_order)  # stable: the collection order holds within each class


def _uses_a_fixture_of_its_module(item) -> bool:
  """Whether `item` uses a module-scoped fixture defined in its own module."""
  info = getattr(item, "_fixtureinfo", None)
  module = item.nodeid.split("::")[0]
  return any(definitions and definitions[-1].scope == "module" and definitions[-1].baseid == module
             for definitions in (info.name2fixturedefs.values() if info else ()))


def pytest_configure(config):
  """Refuses `--dist loadgroup` where it would silently do nothing: xdist groups tests by writing `item._nodeid`,
  which pytest 9.2 no longer reads (its node ids live in `_id`), so every group would be split across workers."""
  if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
    return
  from _pytest import nodes
  probe = type("Probe", (), {"_nodeid": "test.py::test@group", "_id": "test.py::test"})()
  if nodes.Node.nodeid.fget(probe) != probe._nodeid:
    raise pytest.UsageError("--dist loadgroup has no effect with this pytest (node ids ignore xdist's `@group`); "
                            "install the pytest pinned in constraints.txt")


@pytest.fixture(scope="session")
def run_shared_dir(tmp_path_factory):
  """The folder the test processes of one run share: the run's base temp dir above each xdist worker's own."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def trained_run(run_shared_dir):
  """A toy run (the quick config without its final evaluation) trained once per test run and read by every test that
  loads a checkpoint (scripts/predict.py, the demo): the first xdist worker to ask trains it under a file lock, the
  others wait and read it. Steps 1 (Orbax keeps a run's first step), 3 and 80 are kept: step 1 still answers
  without `[SEG]` (garbage text), the newest (80) answers "Sure, it is [SEG]." with a non-empty mask. Training
  steps of the tiny model are cheap next to compilation (80 steps cost about the CPU time of 3)."""
  shared = run_shared_dir
  workdir = shared / "toy_run"
  finished = shared / "toy_run.trained"
  with open(shared / "toy_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if training fails
    if not finished.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a try that failed in another worker
      _train_toy_run_on_one_device(str(workdir))
      finished.write_text("trained\n")
  return str(workdir)


def _train_toy_run_on_one_device(workdir: str) -> None:
  """`_train_toy_run` in a process with one CPU device: the tests that read the run do not depend on its mesh, and
  one device trains it in about half the time of the suite's 8 (44 s against 78 s alone on 2 cores, 2026-12-06)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 " + TEST_XLA_FLAGS)
  command = [sys.executable, "-c", "import sys, conftest; conftest._train_toy_run(sys.argv[1])", workdir]
  result = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True)
  if result.returncode:
    raise AssertionError(f"training the toy run in {workdir} exited with {result.returncode}:\n{result.stderr[-4000:]}")


def _train_toy_run(workdir: str) -> None:
  import configs.toy as toy_config
  from unires_jax import run as runner

  config = toy_config.get_config("quick")
  config.train.total_steps = 80
  config.train.checkpoint_every = 1000  # no interval saves: each took about 2 s, 50 s of the fixture for 26 unread steps
  config.train.checkpoint_steps = (3,)
  config.train.keep_last = 100
  config.train.async_checkpoint = False
  # After 80 steps on the main job's mix (many no-target phrases, decision weight 16) the model answers "no target"
  # to everything; these tests want a checkpoint that already answers with [SEG], so it trains on the CRIS-layout
  # split alone (objects and parts, every phrase targeted).
  config.data.sources = tuple(s for s in config.data.sources if "synthetic_cris" in s["dir"])
  config.evals = {}
  runner.run(config, workdir)
