"""What an image record is: the schema of docs/DESIGN.md ("Image records"), its checks and its msgpack bytes.

`validate_record` raises `RecordError` naming the record (or the file and index it came from) and the key that
breaks the schema; `encode_record` / `decode_record` are the only way a record becomes bytes and back.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import msgpack
import numpy as np

DATASETS = ("refcoco", "refcoco+", "refcocog", "grefcoco", "refcocom", "mres32m", "synthetic")
ANNOTATION_GRANULARITIES = ("object", "part")
REF_GRANULARITIES = ("object", "multi-object", "part", "no-target")
PROPOSAL_KINDS = ("object", "part")
# The `proposals.source` of the two trivial sources (unires_jax/proposals/annotations.py describes itself with these).
GT_BOXES_SOURCE = "annotations (ground-truth boxes)"
NO_BOXES_SOURCE = "none (no boxes)"


class RecordError(ValueError):
  """A record that does not follow the schema, or a shard that cannot be read."""


# ----------------------------------------------------------------------------------------------- validation


def _expect(condition: bool, where: str, key: str, expected: str, value: Any) -> None:
  if not condition:
    shown = repr(value)
    if len(shown) > 80:
      shown = shown[:77] + "..."
    raise RecordError(f"record {where}: {key!r} must be {expected}, got {shown}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _require(mapping: Any, keys: Sequence[str], where: str) -> None:
  _expect(isinstance(mapping, dict), where, "(entry)", "a dict", type(mapping).__name__)
  for key in keys:
    if key not in mapping:
      raise RecordError(f"record {where}: key {key!r} missing")


def _validate_box(box: Any, where: str, key: str) -> None:
  _expect(isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box), where, key,
          "[x0, y0, x1, y1] numbers", box)
  _expect(all(math.isfinite(float(v)) for v in box), where, key, "finite numbers (no NaN or inf)", box)
  _expect(box[2] >= box[0] and box[3] >= box[1], where, key, "ordered (x1 >= x0, y1 >= y0)", box)


def empty_proposals(source: str = NO_BOXES_SOURCE) -> dict:
  """A record's `proposals` entry with no boxes (what the readers write before a proposal source runs)."""
  return {"object": [], "part": [], "object_scores": [], "part_scores": [], "source": source}


def _validate_proposals(proposals: Any, where: str) -> None:
  if isinstance(proposals, dict) and "source" not in proposals:
    raise RecordError(f"record {where}: key 'source' missing in proposals (a record written before proposals "
                      f"carried their source; prepare the split again with scripts/prepare_data.py)")
  _require(proposals, PROPOSAL_KINDS + tuple(f"{kind}_scores" for kind in PROPOSAL_KINDS) + ("source",),
           f"{where} proposals")
  _expect(isinstance(proposals["source"], str) and proposals["source"], where, "proposals.source",
          "a non-empty str naming the proposal source", proposals["source"])
  for kind in PROPOSAL_KINDS:
    boxes, scores = proposals[kind], proposals[f"{kind}_scores"]
    _expect(isinstance(boxes, list), where, f"proposals.{kind}", "a list of boxes", boxes)
    for j, box in enumerate(boxes):
      _validate_box(box, where, f"proposals.{kind}[{j}]")
    _expect(isinstance(scores, list) and len(scores) == len(boxes) and all(_is_number(s) for s in scores), where,
            f"proposals.{kind}_scores", f"a list of {len(boxes)} numbers (one per box)", scores)


def validate_record(record: Any, where: str) -> None:
  """Checks the DESIGN.md schema; raises RecordError naming `where` and the offending key."""
  _require(record, ("dataset", "image_id", "file_name", "height", "width", "image_bytes", "annotations",
                    "proposals", "refs"), where)
  _expect(isinstance(record["dataset"], str), where, "dataset", "a str", record["dataset"])
  _expect(_is_int(record["image_id"]), where, "image_id", "an int", record["image_id"])
  _expect(isinstance(record["file_name"], str), where, "file_name", "a str", record["file_name"])
  for key in ("height", "width"):
    _expect(_is_int(record[key]) and record[key] > 0, where, key, "a positive int", record[key])
  _expect(isinstance(record["image_bytes"], bytes), where, "image_bytes", "bytes", type(record["image_bytes"]))
  size = [int(record["height"]), int(record["width"])]

  _expect(isinstance(record["annotations"], list), where, "annotations", "a list", record["annotations"])
  ann_ids = set()
  for i, ann in enumerate(record["annotations"]):
    at = f"{where} annotations[{i}]"
    _require(ann, ("ann_id", "category", "granularity", "bbox", "rle"), at)
    _expect(_is_int(ann["ann_id"]), at, "ann_id", "an int", ann["ann_id"])
    _expect(isinstance(ann["category"], str), at, "category", "a str", ann["category"])
    _expect(ann["granularity"] in ANNOTATION_GRANULARITIES, at, "granularity", f"one of {ANNOTATION_GRANULARITIES}",
            ann["granularity"])
    _validate_box(ann["bbox"], at, "bbox")
    rle = ann["rle"]
    _require(rle, ("size", "counts"), f"{at} rle")
    _expect(list(rle["size"]) == size, at, "rle.size", f"the image size {size}", rle["size"])
    _expect(isinstance(rle["counts"], str), at, "rle.counts", "a compressed RLE str", type(rle["counts"]))
    ann_ids.add(int(ann["ann_id"]))

  _validate_proposals(record["proposals"], where)

  _expect(isinstance(record["refs"], list), where, "refs", "a list", record["refs"])
  for i, ref in enumerate(record["refs"]):
    at = f"{where} refs[{i}]"
    _require(ref, ("ref_id", "split", "ann_ids", "granularity", "sentences"), at)
    _expect(_is_int(ref["ref_id"]), at, "ref_id", "an int", ref["ref_id"])
    _expect(isinstance(ref["split"], str), at, "split", "a str", ref["split"])
    _expect(isinstance(ref["ann_ids"], list) and all(_is_int(a) for a in ref["ann_ids"]), at, "ann_ids",
            "a list of ints", ref["ann_ids"])
    unknown = [a for a in ref["ann_ids"] if int(a) not in ann_ids]
    _expect(not unknown, at, "ann_ids", "ids of this record's annotations", unknown)
    _expect(ref["granularity"] in REF_GRANULARITIES, at, "granularity", f"one of {REF_GRANULARITIES}",
            ref["granularity"])
    _expect((ref["granularity"] == "no-target") == (not ref["ann_ids"]), at, "granularity",
            "'no-target' exactly when ann_ids is empty", ref["granularity"])
    _expect(isinstance(ref["sentences"], list) and ref["sentences"], at, "sentences", "a non-empty list",
            ref["sentences"])
    for j, sentence in enumerate(ref["sentences"]):
      st = f"{at} sentences[{j}]"
      _require(sentence, ("sent_id", "sent"), st)
      _expect(_is_int(sentence["sent_id"]), st, "sent_id", "an int", sentence["sent_id"])
      _expect(isinstance(sentence["sent"], str), st, "sent", "a str", sentence["sent"])


def encode_record(record: dict) -> bytes:
  """Validates and serialises one image record."""
  where = f"{record.get('dataset', '?')}/{record.get('image_id', '?')}" if isinstance(record, dict) else "?"
  validate_record(record, where)
  return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes, where: str) -> dict:
  """Parses and validates one serialised record; `where` (file and index) names it in errors."""
  try:
    record = msgpack.unpackb(data, raw=False, strict_map_key=False)
  except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError, TypeError) as error:
    raise RecordError(f"record {where}: corrupt msgpack data ({type(error).__name__}: {error})") from error
  validate_record(record, where)
  return record
