"""The package's import directions: scripts → train / eval → models / data → core, and no cycles.

Each package of `unires_jax/` has a layer; a module may import its own package and packages of lower layers only
(plus the explicit exceptions below, each with its reason). Imports inside functions count too: a deferred import
still couples two packages.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = os.path.join(ROOT, "unires_jax")

# What each top-level part of the package may import (besides itself).
ALLOWED = {
    "core": set(),                                   # registry.py, sharding.py, perf.py
    "models": {"core"},
    "data": {"core"},
    "convert": {"core", "models", "data"},           # tables over models; the PyTorch side reuses data's numpy
    "proposals": {"core", "models", "data", "convert"},
    "eval": {"core", "models", "data", "convert", "proposals"},
    "train": {"core", "models", "data", "convert", "proposals"},
    "demo": {"core", "models", "data", "convert", "proposals", "eval"},
    "run": {"core", "models", "data", "convert", "proposals", "eval", "train"},  # run.py: joins train and eval
}
CORE_MODULES = {"registry", "sharding", "perf", "benchmark_io", "cli", "errors", "pixel_stats", "tree_paths",
                "checkpointing", "xla_defaults", "__init__"}


def part_of(module: str) -> str:
  """'unires_jax.eval.metrics' → 'eval'; top-level modules are 'core' (or their own name if listed)."""
  pieces = module.split(".")
  if len(pieces) == 1:
    return "core"
  name = pieces[1]
  if name in ALLOWED:
    return name
  if name in CORE_MODULES:
    return "core"
  return name


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str) -> set[str]:
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name.startswith("unires_jax"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unires_jax"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        found.add(candidate if os.path.exists(os.path.join(ROOT, *candidate.split(".")) + ".py") else node.module)
  return found


def package_modules() -> dict[str, str]:
  modules = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        modules[module_name(path)] = path
  return modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle in a directed graph as a list of nodes (first == last), or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 1:
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_part_of():
  assert part_of("unires_jax.eval.metrics") == "eval"
  assert part_of("unires_jax.sharding") == "core"
  assert part_of("unires_jax") == "core"


def test_imports_flow_one_way():
  wrong = []
  for module, path in sorted(package_modules().items()):
    source = part_of(module)
    assert source in ALLOWED, f"{module}: package part {source!r} has no layer in tests/test_imports.py ALLOWED"
    for target in sorted(imports_of(path)):
      target_part = part_of(target)
      if target_part != source and target_part not in ALLOWED[source]:
        wrong.append(f"{module} ({source}) imports {target} ({target_part})")
  assert not wrong, "imports against the direction scripts → train/eval → models/data → core:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
  modules = package_modules()
  graph = {}
  for module, path in modules.items():
    graph[module] = {t for t in imports_of(path) if t in modules and t != module
                     and not module.startswith(t + ".")}  # a package's own __init__ is not a cycle
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_package_imports_no_script():
  """scripts/ are command-line shells over the package: nothing in `unires_jax/` may import them."""
  wrong = []
  for module, path in sorted(package_modules().items()):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
      wrong += [f"{module} imports {name}" for name in names if name == "scripts" or name.startswith("scripts.")]
  assert not wrong, "the package imports scripts/:\n" + "\n".join(wrong)
