"""The restricted unpickler: builtin data loads unchanged; code-running or class-naming pickles are refused."""

from __future__ import annotations

import os
import pickle

import pytest

from unires_jax.data import safe_pickle


class _RunsCommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _Plain:
  pass


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_builtin_containers_round_trip(protocol):
  value = [{"ref_id": 1, "sentences": [{"sent": "the dog", "tokens": ("the", "dog")}], "score": 0.5,
            "ok": True, "none": None, "raw": b"\x00\xff", "ids": {3, 4}, "frozen": frozenset({1})}]
  assert safe_pickle.loads(pickle.dumps(value, protocol=protocol)) == value


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_reduce_to_os_system_is_refused_and_nothing_runs(tmp_path, protocol):
  marker = tmp_path / "ran"
  data = pickle.dumps([{"ref_id": 1}, _RunsCommand(marker)], protocol=protocol)
  # The payload is real: the ordinary unpickler would create the marker.
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"refers to (posix|os|nt)\.system"):
    safe_pickle.loads(data, where="refs(unc).p")
  assert not marker.exists()
  pickle.loads(data)
  assert marker.exists()


def test_class_instances_are_refused(tmp_path):
  path = tmp_path / "refs(unc).p"
  path.write_bytes(pickle.dumps([_Plain()], protocol=2))
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"refs\(unc\)\.p.*_Plain"):
    safe_pickle.load_file(str(path))
