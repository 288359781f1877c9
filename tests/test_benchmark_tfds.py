"""The format decision: prepared splits are the project's records, not TFDS; benchmark_tfds measures the other way."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_the_package_does_not_import_tensorflow_datasets():
  importers = []
  for folder, _, names in os.walk(os.path.join(ROOT, "unires_jax")):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        tree = ast.parse(open(path).read(), path)
        modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        if any(m.split(".")[0] == "tensorflow_datasets" for m in modules):
          importers.append(os.path.relpath(path, ROOT))
  assert importers == []


def test_benchmark_round_trips_the_records_through_tfds(tmp_path):
  out = tmp_path / "tfds.json"
  # Run as a script: a TFDS builder defined in a module of a package (`scripts.benchmark_tfds`) needs
  # importlib_resources, which the project does not install (../shared/FORMATS.md).
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_tfds.py"), "--out", str(out),
                  "--images", "3", "--reads", "20", "--pipeline-figures", str(tmp_path / "absent.json")],
                 check=True, capture_output=True, cwd=str(tmp_path))
  report = json.loads(out.read_text())
  assert report["faithful_round_trip"] is True
  assert set(report["records_per_s"]) == {"own_split_source", "tfds_data_source_as_record",
                                          "tfds_data_source_item_only"}
  assert report["read_slowdown"] > 0 and report["pipeline_estimate"] == []
