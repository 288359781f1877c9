"""Image records: one msgpack dict per image in ArrayRecord shards, plus a sample table and an index per split.

An image is stored once however many expressions refer to it; the sample table lists one
`(record_index, ref_index, sentence_index)` row per (ref, sentence), so the pipeline maps over samples in a fixed
order. The record schema is the contract of docs/DESIGN.md ("Image records").
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack
import numpy as np
from pycocotools import mask as mask_utils

from unires_jax.data import images

DATASETS = ("refcoco", "refcoco+", "refcocog", "grefcoco", "refcocom", "mres32m", "synthetic")
ANNOTATION_GRANULARITIES = ("object", "part")
REF_GRANULARITIES = ("object", "multi-object", "part", "no-target")
SAMPLE_TABLE = "sample_table.npy"
INDEX = "index.json"
SHARD_SUMMARY_SUFFIX = ".summary.json"
PROPOSAL_KINDS = ("object", "part")
# The `proposals.source` of the two trivial sources (unires_jax/proposals/annotations.py describes itself with these).
GT_BOXES_SOURCE = "annotations (ground-truth boxes)"
NO_BOXES_SOURCE = "none (no boxes)"


class RecordError(ValueError):
  """A record that does not follow the schema, or a shard that cannot be read."""


def shard_name(shard_index: int, num_shards: int) -> str:
  return f"records-{shard_index:05d}-of-{num_shards:05d}.array_record"


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


# ------------------------------------------------------------------------------------------------- masks


def ground_truth_mask(record: dict, ref: dict) -> np.ndarray:
  """bool [h, w]: union of the referenced annotations' masks; all False for a no-target ref."""
  height, width = int(record["height"]), int(record["width"])
  by_id = {int(ann["ann_id"]): ann for ann in record["annotations"]}
  rles = []
  for ann_id in ref["ann_ids"]:
    if int(ann_id) not in by_id:
      raise RecordError(f"record {record['dataset']}/{record['image_id']} ref {ref['ref_id']}: "
                        f"ann_id {ann_id} is not among the record's annotations")
    rle = by_id[int(ann_id)]["rle"]
    rles.append({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")})
  if not rles:
    return np.zeros((height, width), bool)
  merged = mask_utils.merge(rles, intersect=0) if len(rles) > 1 else rles[0]
  return mask_utils.decode(merged).astype(bool)


# ------------------------------------------------------------------------------------------------ writing


def _atomic_write_bytes(path: str, data: bytes) -> None:
  temp = f"{path}.tmp-{os.getpid()}"
  with open(temp, "wb") as f:
    f.write(data)
  os.replace(temp, path)


def _summarise(record: dict) -> dict:
  """What the index and sample table need from a record, without its pixels."""
  return {
      "image_id": int(record["image_id"]),
      "num_annotations": len(record["annotations"]),
      "sentences_per_ref": [len(ref["sentences"]) for ref in record["refs"]],
      "ref_granularities": [ref["granularity"] for ref in record["refs"]],
      "proposal_source": record["proposals"]["source"],
      "proposal_counts": [len(record["proposals"][kind]) for kind in PROPOSAL_KINDS],
  }


def write_shard(records: Iterable[dict], path: str, skipped: Mapping[str, int] | None = None,
                proposal_report: Callable[[], dict] | None = None,
                skipped_entries: Sequence[str] | None = None) -> dict:
  """Writes one ArrayRecord shard atomically (temp name, then rename) and its summary beside it.

  The summary (`<shard>.summary.json`) is written after the shard, so a shard with a summary is complete; a rerun
  of prepare_data skips it. `proposal_report()`, called once every record is written, is what the proposal source
  counted on this shard (e.g. `DetectionFiles.report()`); it is kept in the summary as `proposal_report`.
  `skipped` (counts by reason) and `skipped_entries` (where each dropped entry was) are read after `records` is
  exhausted too, so entries a lazy reader drops while it runs are counted.
  """
  from array_record.python import array_record_module

  temp = f"{path}.tmp-{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(temp, "group_size:1")
  summaries = []
  try:
    for record in records:
      writer.write(encode_record(record))
      summaries.append(_summarise(record))
  except BaseException:
    writer.close()
    os.remove(temp)
    raise
  writer.close()
  os.replace(temp, path)
  summary = {"shard": os.path.basename(path), "records": summaries, "skipped": dict(skipped or {}),
             "skipped_entries": list(skipped_entries or [])}
  if proposal_report is not None:
    summary["proposal_report"] = proposal_report()
  _atomic_write_bytes(path + SHARD_SUMMARY_SUFFIX, json.dumps(summary).encode())
  return summary


def read_shard_summary(path: str) -> dict | None:
  """The summary of a completed shard, or None when the shard is missing or unfinished."""
  summary_path = path + SHARD_SUMMARY_SUFFIX
  if not (os.path.exists(path) and os.path.exists(summary_path)):
    return None
  with open(summary_path) as f:
    return json.load(f)


def file_checksum(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return "sha256:" + digest.hexdigest()


def finalize_split(out_dir: str, num_shards: int, *, dataset: str = "", split: str = "",
                   source_files: Sequence[str] = (), extra_skipped: dict[str, int] | None = None,
                   proposal_summary: dict | None = None) -> dict:
  """Builds sample_table.npy and index.json from the shard summaries; returns the index.

  `index.proposals` holds the images per proposal source, the stored box counts and, when given,
  `proposal_summary` (what the source counted: for detection files, unmatched ids and clipped boxes).
  """
  rows = []
  shard_sizes = []
  granularity = collections.Counter()
  proposal_sources = collections.Counter()
  proposal_boxes = collections.Counter()
  skipped = collections.Counter(extra_skipped or {})
  skipped_entries: list[str] = []
  num_refs = num_masks = 0
  record_index = 0
  for k in range(num_shards):
    path = os.path.join(out_dir, shard_name(k, num_shards))
    summary = read_shard_summary(path)
    if summary is None:
      raise RecordError(f"split {out_dir}: shard {shard_name(k, num_shards)} is missing or unfinished")
    shard_sizes.append(len(summary["records"]))
    skipped.update(summary["skipped"])
    skipped_entries.extend(summary.get("skipped_entries", []))
    for record_summary in summary["records"]:
      if "proposal_source" not in record_summary:
        raise RecordError(f"split {out_dir}: shard summary {shard_name(k, num_shards)}{SHARD_SUMMARY_SUFFIX} "
                          f"has no 'proposal_source' (written before proposals carried their source); delete "
                          f"the split and prepare it again")
      proposal_sources[record_summary["proposal_source"]] += 1
      proposal_boxes.update(dict(zip(PROPOSAL_KINDS, record_summary["proposal_counts"])))
      num_masks += record_summary["num_annotations"]
      for ref_index, (count, ref_granularity) in enumerate(
          zip(record_summary["sentences_per_ref"], record_summary["ref_granularities"])):
        num_refs += 1
        granularity[ref_granularity] += count
        rows.extend((record_index, ref_index, s) for s in range(count))
      record_index += 1
  table = np.asarray(rows, np.int32).reshape(-1, 3)  # [num_samples, 3]
  temp = os.path.join(out_dir, f"{SAMPLE_TABLE}.tmp-{os.getpid()}.npy")
  np.save(temp, table)
  os.replace(temp, os.path.join(out_dir, SAMPLE_TABLE))
  index = {
      "dataset": dataset,
      "split": split,
      "num_shards": num_shards,
      "shards": [shard_name(k, num_shards) for k in range(num_shards)],
      "records_per_shard": shard_sizes,
      "num_images": record_index,
      "num_refs": num_refs,
      "num_samples": int(table.shape[0]),
      "num_sentences": int(table.shape[0]),
      "num_masks": num_masks,
      "granularity_samples": dict(sorted(granularity.items())),
      "source_checksums": {os.path.basename(p): file_checksum(p) for p in source_files},
      "skipped_bad": dict(sorted(skipped.items())),
      "proposals": {"sources": dict(sorted(proposal_sources.items())),
                    **{f"{kind}_boxes": proposal_boxes[kind] for kind in PROPOSAL_KINDS},
                    **({"summary": proposal_summary} if proposal_summary is not None else {})},
      "skipped_bad_entries": skipped_entries,
  }
  _atomic_write_bytes(os.path.join(out_dir, INDEX), json.dumps(index, indent=2).encode())
  return index


def write_split(records: Iterable[dict], out_dir: str, num_shards: int, *, dataset: str = "", split: str = "",
                source_files: Sequence[str] = (), skipped: dict[str, int] | None = None) -> dict:
  """Writes records round-robin into `num_shards` shards (record j → shard j mod n), the sample table and index.

  `skipped` counts the malformed entries a reader dropped (`skip_bad`), so they land in index.json.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  os.makedirs(out_dir, exist_ok=True)
  buckets: list[list[dict]] = [[] for _ in range(num_shards)]
  for j, record in enumerate(records):
    buckets[j % num_shards].append(record)
  for k, bucket in enumerate(buckets):
    write_shard(bucket, os.path.join(out_dir, shard_name(k, num_shards)))
  return finalize_split(out_dir, num_shards, dataset=dataset, split=split, source_files=source_files,
                        extra_skipped=skipped)


# ------------------------------------------------------------------------------------------------ reading


def read_index(split_dir: str) -> dict:
  """The split's index.json (written by finalize_split)."""
  index_path = os.path.join(split_dir, INDEX)
  if not os.path.exists(index_path):
    raise FileNotFoundError(f"prepared split {split_dir}: {INDEX} missing (run scripts/prepare_data.py)")
  with open(index_path) as f:
    return json.load(f)


class SplitSource:
  """Random access to a prepared split: `len()` samples, `record(i)` images, `sample(i)` (record, ref, sentence)."""

  def __init__(self, split_dir: str):
    import grain

    self.split_dir = split_dir
    self.index = read_index(split_dir)
    self.shard_paths = [os.path.join(split_dir, name) for name in self.index["shards"]]
    self._offsets = np.cumsum([0] + list(self.index["records_per_shard"]))  # [num_shards + 1]
    self.sample_table = np.load(os.path.join(split_dir, SAMPLE_TABLE))  # [num_samples, 3] int32
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)
    except Exception as error:  # the ArrayRecord reader raises a bare RuntimeError on a damaged file
      raise RecordError(f"prepared split {split_dir}: cannot open shards {self.index['shards']} "
                        f"(truncated or corrupt?): {type(error).__name__}: {error}") from error
    if len(self._source) != self.num_records:
      raise RecordError(f"prepared split {split_dir}: shards hold {len(self._source)} records, "
                        f"{INDEX} says {self.num_records}")

  @property
  def num_records(self) -> int:
    return int(self._offsets[-1])

  def __len__(self) -> int:
    return int(self.sample_table.shape[0])

  def _where(self, record_index: int) -> str:
    shard = int(np.searchsorted(self._offsets, record_index, side="right")) - 1
    return f"{self.shard_paths[shard]}[{record_index - int(self._offsets[shard])}]"

  def record(self, record_index: int) -> dict:
    if not 0 <= record_index < self.num_records:
      raise IndexError(f"record index {record_index} out of range [0, {self.num_records}) in {self.split_dir}")
    where = self._where(record_index)
    try:
      data = self._source[record_index]
    except Exception as error:
      raise RecordError(f"record {where}: unreadable ({type(error).__name__}: {error})") from error
    return decode_record(data, where)

  def sample(self, sample_index: int) -> dict:
    if not 0 <= sample_index < len(self):
      raise IndexError(f"sample index {sample_index} out of range [0, {len(self)}) in {self.split_dir}")
    record_index, ref_index, sentence_index = (int(v) for v in self.sample_table[sample_index])
    record = self.record(record_index)
    ref = record["refs"][ref_index]
    sentence = ref["sentences"][sentence_index]
    ids = {"dataset": record["dataset"], "split": ref["split"], "ref_id": int(ref["ref_id"]),
           "sent_id": int(sentence["sent_id"]), "image_id": int(record["image_id"]),
           "granularity": ref["granularity"]}
    return {"record": record, "ref": ref, "sentence": sentence, "ids": ids}


def decode_image(record: dict) -> np.ndarray:
  """uint8 [h, w, 3] from the record's encoded bytes; the size must match the record's height/width."""
  where = f"{record['dataset']}/{record['image_id']} ({record['file_name']})"
  try:
    pixels = images.load_image(record["image_bytes"], where=f"record {where}")  # upright, any PIL mode
  except images.ImageError as error:
    raise RecordError(str(error)) from error
  if pixels.shape[:2] != (record["height"], record["width"]):
    raise RecordError(f"record {where}: image decodes to {pixels.shape[:2]}, the record says "
                                  f"{(record['height'], record['width'])}")
  return pixels
