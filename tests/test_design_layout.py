"""docs/DESIGN.md's layout section names every module of the package, and every `*.py` it names exists."""

import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _layout_section() -> str:
  with open(os.path.join(ROOT, "docs", "DESIGN.md")) as f:
    text = f.read()
  return text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]


def _files(*tops: str) -> set[str]:
  return {name for top in tops for _, _, names in os.walk(os.path.join(ROOT, top)) for name in names}


def test_every_module_is_in_the_layout_section():
  layout = _layout_section()
  missing = sorted(os.path.relpath(os.path.join(folder, name), ROOT)
                   for folder, _, names in os.walk(os.path.join(ROOT, "unires_jax"))
                   for name in names if name.endswith(".py") and name != "__init__.py" and f"`{name}`" not in layout
                   and f"{name}`" not in layout and f" {name}" not in layout)
  assert not missing, f"modules missing from docs/DESIGN.md's layout section: {missing}"


def test_every_file_the_layout_names_exists():
  named = set(re.findall(r"([A-Za-z_0-9]+\.py)\b", _layout_section()))
  unknown = sorted(named - _files("unires_jax", "scripts", "configs", "tests"))
  assert not unknown, f"docs/DESIGN.md's layout section names files that do not exist: {unknown}"
