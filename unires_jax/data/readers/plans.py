"""Per-image plans: what to read for one image, built in image order, one shard's share at a time."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from unires_jax.data.readers.errors import BadEntries, MalformedEntryError
from unires_jax.data.readers.fields import _upright


@dataclasses.dataclass(frozen=True)
class _ImagePlan:
  """One image to read; `build` loads pixels and masks (the costly part) only for the shard that keeps it."""
  sort_key: Any
  build: Callable[[], dict | None]


def _plan_bad(bad: BadEntries, shard: tuple[int, int] | None) -> BadEntries:
  """Entries dropped while planning are seen by every shard's reader; only shard 0 counts them."""
  return bad if shard is None or shard[0] == 0 else BadEntries()


def _emit(plans: list[_ImagePlan], bad: BadEntries, skip_bad: bool,
          shard: tuple[int, int] | None) -> Iterator[dict]:
  """Builds the plans in order; with `shard=(k, n)` only the images whose position is k mod n."""
  plans = sorted(plans, key=lambda plan: plan.sort_key)
  for position, plan in enumerate(plans):
    if shard is not None and position % shard[1] != shard[0]:
      continue
    try:
      record = plan.build()
      if record is not None:
        record = _upright(record)
    except MalformedEntryError as error:
      bad.handle(error, skip_bad)
      continue
    if record is not None:
      yield record
