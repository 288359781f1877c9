"""Prepared splits: image records in ArrayRecord shards, plus a sample table and an index per split.

An image is stored once however many expressions refer to it; the sample table lists one
`(record_index, ref_index, sentence_index)` row per (ref, sentence), so the pipeline maps over samples in a fixed
order. What a record holds, and its bytes, is unires_jax/data/record_schema.py (re-exported here, so
`records.validate_record`, `records.RecordError`, ... keep working); why the split is not a TFDS dataset is
docs/data_pipeline.md ("On-disk format").
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from unires_jax.data import images
from unires_jax.data.record_schema import (  # noqa: F401  (the record schema, re-exported for callers)
    ANNOTATION_GRANULARITIES, DATASETS, GT_BOXES_SOURCE, NO_BOXES_SOURCE, PROPOSAL_KINDS, REF_GRANULARITIES,
    RecordError, decode_record, empty_proposals, encode_record, validate_record)

SAMPLE_TABLE = "sample_table.npy"
INDEX = "index.json"
SHARD_SUMMARY_SUFFIX = ".summary.json"


def shard_name(shard_index: int, num_shards: int) -> str:
  return f"records-{shard_index:05d}-of-{num_shards:05d}.array_record"


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
