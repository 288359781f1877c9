"""What every `scripts/benchmark_*.py` shares around its measurements: `size=batch` options and the JSON report file.

Light on purpose (no JAX import): the data benchmarks start worker processes. The measurements: `perf.py`."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping


def parse_batch_sizes(text: str, defaults: Mapping[str, int]) -> dict[str, int]:
  """`defaults` with the `size=batch` pairs of a `--batch-sizes` option (comma-separated) put over them."""
  batch_sizes = dict(defaults)
  for pair in filter(None, text.split(",")):
    name, sep, value = pair.partition("=")
    if name not in defaults:
      raise ValueError(f"--batch-sizes entry {pair!r}: {name!r} is not a model size; expected one of "
                       f"{sorted(defaults)}")
    if not sep or not value.isdigit() or int(value) == 0:
      raise ValueError(f"--batch-sizes entry {pair!r}: expected size=batch with a positive integer batch, "
                       "e.g. small=4")
    batch_sizes[name] = int(value)
  return batch_sizes


def write_report(path: str, report: Any, indent: int = 2) -> None:
  """Writes a benchmark's JSON report, making its folder. The file is replaced whole (written beside it, then
  renamed), so an interrupted run leaves the previous report, never half of one."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    with open(temporary, "w") as f:
      json.dump(report, f, indent=indent)
      f.write("\n")
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
