"""A name → object registry, so configs pick evaluators and datasets by string instead of if-chains."""

from __future__ import annotations

from typing import Any, Callable


class Registry:
  """Maps names to callables. `register(name)` is a decorator; `lookup(name)` fails with the known names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    def decorator(obj):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = obj
      return obj
    return decorator

  def lookup(self, name: str) -> Any:
    if name not in self._entries:
      known = ", ".join(sorted(self._entries)) or "(none)"
      raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
