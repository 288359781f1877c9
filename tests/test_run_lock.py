"""The workdir lock: a second trainer is refused naming the holder, a dead holder's lock is taken over, one lock
per multi-process run, and workdirs that are files or read-only are named as such."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from unires_jax.train import run_lock

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

HOLDER_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    from unires_jax.train import run_lock
    with run_lock.hold({workdir!r}, process_index=0, process_count=1):
      print("locked", flush=True)
      sys.stdin.readline()
''')


@pytest.fixture
def holder(tmp_path):
  """Another process holding the lock of tmp_path/run until the test ends."""
  workdir = str(tmp_path / "run")
  process = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT.format(repo=REPO, workdir=workdir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "locked"
  yield workdir, process
  process.stdin.close()
  process.wait(timeout=30)


def test_a_second_trainer_is_refused_naming_the_holder(holder):
  workdir, process = holder
  with pytest.raises(run_lock.RunLockedError) as caught:
    with run_lock.hold(workdir, process_index=0, process_count=1):
      pass
  message = str(caught.value)
  assert f"pid {process.pid} on host {socket.gethostname()}" in message and "started 20" in message
  assert os.path.join(workdir, run_lock.LOCK_FILE) in message
  with open(os.path.join(workdir, run_lock.LOCK_FILE)) as f:
    assert json.load(f)["pid"] == process.pid  # the refused one changed nothing


def test_the_lock_is_released_after_the_run(tmp_path):
  workdir = str(tmp_path / "run")
  with run_lock.hold(workdir, process_index=0, process_count=1) as lock:
    with open(lock.path) as f:
      assert json.load(f)["pid"] == os.getpid()
    with run_lock.hold(workdir, process_index=0, process_count=1) as inner:  # re-entrant in one process
      assert inner is lock
  assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_FILE))
  with run_lock.hold(workdir, process_index=0, process_count=1):
    pass


def test_a_dead_holders_lock_is_taken_over_with_a_message(tmp_path, caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = {"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00+00:00"}
  (workdir / run_lock.LOCK_FILE).write_text(json.dumps(stale))
  with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
    with run_lock.hold(str(workdir), process_index=0, process_count=1):
      with open(workdir / run_lock.LOCK_FILE) as f:
        assert json.load(f)["pid"] == os.getpid()
  assert f"stale lock of pid {dead.pid} on host {socket.gethostname()} (started 2026-01-01" in caplog.text


def test_multi_process_runs_hold_one_lock_on_process_0(tmp_path):
  workdir = str(tmp_path / "run")
  told = []
  with run_lock.hold(workdir, process_index=1, process_count=2, broadcast=lambda v: told.append(v) or 1) as lock:
    assert lock is None and not os.path.exists(os.path.join(workdir, run_lock.LOCK_FILE))
  with run_lock.hold(workdir, process_index=0, process_count=2, broadcast=lambda v: told.append(v) or v) as lock:
    assert lock.held and os.path.exists(lock.path)
  assert told == [1, 1]


def test_a_refusal_on_process_0_stops_the_other_processes(holder):
  workdir, _ = holder
  told = []
  with pytest.raises(run_lock.RunLockedError, match="in use by pid"):
    with run_lock.hold(workdir, process_index=0, process_count=2, broadcast=lambda v: told.append(v) or v):
      pass
  assert told == [0]
  with pytest.raises(run_lock.RunLockedError, match="process 0 could not lock it"):
    with run_lock.hold(workdir, process_index=1, process_count=2, broadcast=lambda v: 0):
      pass


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  with pytest.raises(NotADirectoryError, match=f"workdir '{afile}' is a file, not a directory"):
    with run_lock.hold(str(afile), process_index=0, process_count=1):
      pass


def test_a_read_only_workdir_is_named(tmp_path):
  readonly = tmp_path / "ro"
  readonly.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True)
  if mounted.returncode:
    if os.geteuid() == 0:
      pytest.skip(f"root ignores directory permissions and no read-only mount is possible: {mounted.stderr!r}")
    readonly.chmod(0o555)
  try:
    with pytest.raises(PermissionError, match=f"workdir '{readonly}' is not writable"):
      with run_lock.hold(str(readonly), process_index=0, process_count=1):
        pass
    with pytest.raises(PermissionError, match=f"workdir '{readonly}/run' cannot be created"):
      with run_lock.hold(str(readonly / "run"), process_index=0, process_count=1):
        pass
  finally:
    if not mounted.returncode:
      subprocess.run(["umount", "-l", str(readonly)], check=False)
