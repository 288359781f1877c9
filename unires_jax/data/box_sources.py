"""Which boxes a batch carries (`data.box_source`) and how metrics files name them."""

from __future__ import annotations

from typing import Any

from unires_jax.data import records as records_lib

# data.box_source: the record's proposals (whatever made them), the ground-truth annotation boxes, or no boxes.
BOX_SOURCES = ("proposals", "annotations", "none")


def box_source_of(split_dir: str, data: Any) -> str:
  """What the object and part boxes of `split_dir`'s batches are, for metrics files: `records.GT_BOXES_SOURCE`
  (`data.box_source='annotations'`), `records.NO_BOXES_SOURCE` ('none'), or with 'proposals' the source the
  split's records name (index.json `proposals.sources`; several sources are listed with their image counts).
  Training noise is not part of it: it never touches evaluation batches. `data` is a `DataConfig` or the
  `config.data` ConfigDict."""
  box_source = data.box_source
  if box_source not in BOX_SOURCES:
    raise ValueError(f"data.box_source {box_source!r}: expected one of {BOX_SOURCES}")
  if box_source == "annotations":
    return records_lib.GT_BOXES_SOURCE
  if box_source == "none":
    return records_lib.NO_BOXES_SOURCE
  sources = records_lib.read_index(split_dir).get("proposals", {}).get("sources")
  if not sources:
    raise records_lib.RecordError(f"prepared split {split_dir}: {records_lib.INDEX} has no 'proposals.sources' "
                                  f"(prepared before records carried their proposal source); prepare it again")
  if len(sources) == 1:
    return next(iter(sources))
  return " + ".join(f"{source} on {count} images" for source, count in sorted(sources.items()))


def uses_ground_truth_boxes(box_source: str) -> bool:
  """Whether a `box_source_of` description involves ground-truth boxes (benchmark evaluation refuses those)."""
  return records_lib.GT_BOXES_SOURCE in box_source
