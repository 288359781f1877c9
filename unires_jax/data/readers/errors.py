"""Malformed input entries: the error that names the file and entry, and the counts kept under skip_bad."""

from __future__ import annotations

import collections
import dataclasses


class MalformedEntryError(ValueError):
  """An input entry that cannot become part of a record; `kind` is the counter name used with skip_bad."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass
class BadEntries:
  """Malformed entries dropped under skip_bad: counts per kind and the messages."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list[str] = dataclasses.field(default_factory=list)

  def handle(self, error: MalformedEntryError, skip_bad: bool) -> None:
    if not skip_bad:
      raise error
    self.counts[error.kind] += 1
    self.messages.append(str(error))
