"""A restricted unpickler for the refer layout's `refs(*).p`: only builtin containers and scalars are admitted.

Ordinary `pickle.load` runs whatever callables a file names (a REDUCE of `os.system` executes a command); here
every global lookup is refused except the builtin `set`/`frozenset` and the latin-1 text-to-bytes call that old
protocols reach through a global, so loading never runs code from the file.
"""

from __future__ import annotations

import io
import pickle


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names something other than builtin containers and scalars."""


def _latin1_bytes(text, encoding):
  """Stands in for `_codecs.encode`, which protocols 0-2 use to rebuild Python 3 bytes; accepts only that use."""
  if not isinstance(text, str) or encoding != "latin1":
    raise UnsafePickleError(f"pickle: _codecs.encode called with {type(text).__name__}, {encoding!r}; "
                            "only the latin1 bytes encoding is allowed")
  return text.encode("latin1")


# Protocols 0-2 rebuild sets and bytes through a global call; no other global is needed for builtin containers and
# scalars (dict, list, tuple, str, int, float, bool, None have their own opcodes).
_ALLOWED_GLOBALS = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("__builtin__", "set"): set,
                    ("__builtin__", "frozenset"): frozenset, ("_codecs", "encode"): _latin1_bytes}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, where: str):
    # Python 2 `str` in the refer pickles holds UTF-8 text.
    super().__init__(file, encoding="utf-8", errors="replace")
    self._where = where

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise UnsafePickleError(f"pickle {self._where}: refers to {module}.{name}; only builtin containers and "
                            "scalars (dict, list, tuple, set, str, bytes, int, float, bool, None) are allowed")

  def persistent_load(self, pid):
    raise UnsafePickleError(f"pickle {self._where}: persistent id {pid!r} is not allowed")


def loads(data: bytes, where: str = "<bytes>"):
  """Unpickles builtin containers and scalars only; anything else raises UnsafePickleError naming `where`."""
  return _RestrictedUnpickler(io.BytesIO(data), where).load()


def load_file(path: str):
  with open(path, "rb") as f:
    return _RestrictedUnpickler(f, path).load()
