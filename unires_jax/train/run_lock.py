"""One trainer per workdir: an exclusive lock file `<workdir>/run.lock` naming its holder (host, pid, start time).

The lock is an `flock` on the file, so the kernel drops it when the holder dies however it dies; the file's JSON
says who holds it, for the refusal message. A lock file left by a process that no longer runs (SIGKILL, a crash,
a reboot) is taken over with a warning naming the previous holder. In a multi-process run only process 0 locks
the workdir, for the whole run; the others learn from it whether the run may start.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Callable, Iterator

from unires_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class RunLockedError(UserError):
  """Another live process trains in this workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read_holder(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
  if not text:
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {"unparsed": text[:200]}
  return holder if isinstance(holder, dict) else {"unparsed": text[:200]}


def describe(holder: dict | None) -> str:
  if not holder:
    return "an unknown process"
  if "unparsed" in holder:
    return f"an unknown process (lock file content {holder['unparsed']!r})"
  return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


class RunLock:
  """An exclusive, non-blocking lock of one workdir; `acquire()` raises `RunLockedError` naming the holder."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "RunLock":
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise NotADirectoryError(f"workdir {self.workdir!r} is a file, not a directory")
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as error:
      if error.errno not in NOT_WRITABLE:
        raise
      raise PermissionError(f"workdir {self.workdir!r} cannot be created: {error.strerror} "
                            f"({error.filename})") from error
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as error:
        if error.errno not in NOT_WRITABLE:
          raise
        raise PermissionError(f"workdir {self.workdir!r} is not writable: cannot create its lock file "
                              f"{LOCK_FILE} ({error.strerror})") from error
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunLockedError(f"workdir {self.workdir} is in use by {describe(holder)}: its lock {self.path} is "
                             f"held. Two trainers on one workdir would delete each other's checkpoints; wait for "
                             f"that run to end, stop it, or use another --workdir.") from None
      # The file may have been removed by its previous holder between our open and flock: lock the new one.
      try:
        same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same_file = False
      if same_file:
        break
      os.close(fd)
    previous = _read_holder(fd)
    if previous and "unparsed" not in previous and previous.get("host") == socket.gethostname() and \
        isinstance(previous.get("pid"), int) and previous["pid"] != os.getpid() and _pid_alive(previous["pid"]):
      os.close(fd)
      raise RunLockedError(f"workdir {self.workdir}: its lock {self.path} names {describe(previous)}, which still "
                           f"runs although the lock is free (a file system without flock?). Stop that process or "
                           f"delete the lock file if it is not a trainer.")
    if previous:
      log.warning("workdir %s: taking over a stale lock of %s (that process no longer runs)", self.workdir,
                  describe(previous))
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)  # while still locked, so no one locks the removed file after us
    os.close(self._fd)
    self._fd = None


_HELD: dict[str, RunLock] = {}  # workdirs this process (process 0) holds
_FOLLOWING: set[str] = set()  # workdirs whose lock process 0 holds for this (non-zero) process


def _broadcast_from_process_0(value: int) -> int:
  import numpy as np
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


@contextlib.contextmanager
def hold(workdir: str, process_index: int | None = None, process_count: int | None = None,
         broadcast: Callable[[int], int] | None = None) -> Iterator[RunLock | None]:
  """Holds the workdir's lock for the enclosed block; re-entrant within a process.

  Several processes: process 0 takes the lock and tells the others (`broadcast`, a JAX broadcast by default)
  whether it got it; a refused run stops on every process.
  """
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  key = os.path.abspath(workdir)
  if key in _HELD or (process_count > 1 and process_index != 0 and key in _FOLLOWING):
    yield _HELD.get(key)
    return
  broadcast = broadcast or _broadcast_from_process_0
  lock = RunLock(workdir) if process_index == 0 else None
  error: Exception | None = None
  if lock is not None:
    try:
      lock.acquire()
    except (RunLockedError, OSError) as caught:
      error = caught
  if process_count > 1:
    got_it = broadcast(0 if error is not None else 1)
    if not got_it and error is None:
      error = RunLockedError(f"workdir {key}: process 0 could not lock it (see process 0's log); stopping")
  if error is not None:
    raise error
  if lock is not None:
    _HELD[key] = lock
  else:
    _FOLLOWING.add(key)
  try:
    yield lock
  finally:
    if lock is not None:
      _HELD.pop(key, None)
      lock.release()
    else:
      _FOLLOWING.discard(key)
