"""Image records: schema checks, ArrayRecord round trip, sample table, index counts and damaged shards."""

from __future__ import annotations

import io
import json
import os

import msgpack
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from unires_jax.data import records


def _rle(mask: np.ndarray) -> dict:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _png(height: int, width: int) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
  return buffer.getvalue()


def make_record(image_id: int, num_sentences=(2, 1, 1), height=12, width=16) -> dict:
  left = np.zeros((height, width), bool)
  left[2:8, 1:6] = True
  right = np.zeros((height, width), bool)
  right[4:10, 9:15] = True
  refs = [
      {"ref_id": image_id * 10, "split": "val", "ann_ids": [1], "granularity": "object",
       "sentences": [{"sent_id": image_id * 100 + s, "sent": f"left {s}"} for s in range(num_sentences[0])]},
      {"ref_id": image_id * 10 + 1, "split": "val", "ann_ids": [1, 2], "granularity": "multi-object",
       "sentences": [{"sent_id": image_id * 100 + 10 + s, "sent": "both"} for s in range(num_sentences[1])]},
      {"ref_id": image_id * 10 + 2, "split": "val", "ann_ids": [], "granularity": "no-target",
       "sentences": [{"sent_id": image_id * 100 + 20 + s, "sent": "the cat"} for s in range(num_sentences[2])]},
  ]
  return {
      "dataset": "synthetic", "image_id": image_id, "file_name": f"{image_id}.png", "height": height,
      "width": width, "image_bytes": _png(height, width),
      "annotations": [
          {"ann_id": 1, "category": "box", "granularity": "object", "bbox": [1, 2, 6, 8], "rle": _rle(left)},
          {"ann_id": 2, "category": "box", "granularity": "object", "bbox": [9, 4, 15, 10], "rle": _rle(right)},
      ],
      "proposals": {"object": [[1, 2, 6, 8]], "part": [], "object_scores": [0.75], "part_scores": [],
                    "source": "test detector"},
      "refs": refs,
  }, left, right


def test_encode_decode_round_trip():
  record, _, _ = make_record(3)
  assert records.decode_record(records.encode_record(record), "x") == record


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("height"), "'height' missing"),
    (lambda r: r.__setitem__("width", -3), "'width' must be a positive int"),
    (lambda r: r["refs"][0].__setitem__("ann_ids", [7]), "ids of this record's annotations"),
    (lambda r: r["refs"][0].__setitem__("granularity", "thing"), "'granularity' must be one of"),
    (lambda r: r["refs"][2].__setitem__("granularity", "object"), "'no-target' exactly when"),
    (lambda r: r["annotations"][0]["rle"].__setitem__("size", [3, 3]), "'rle.size' must be the image size"),
    (lambda r: r["proposals"].pop("source"), "'source' missing in proposals .* prepare the split again"),
    (lambda r: r["proposals"].__setitem__("source", ""), "'proposals.source' must be a non-empty str"),
    (lambda r: r["proposals"].pop("part_scores"), "proposals: key 'part_scores' missing"),
    (lambda r: r["proposals"].__setitem__("object_scores", []), "'proposals.object_scores' must be a list of 1 "),
    (lambda r: r["proposals"]["object"].__setitem__(0, [1, 2, 3]), r"'proposals.object\[0\]' must be"),
    (lambda r: r["annotations"][0].__setitem__("bbox", [float("nan"), 0, 2, 2]), "'bbox' must be finite numbers"),
    (lambda r: r["proposals"].__setitem__("object", [[5, 0, 1, 2]]), r"'proposals.object\[0\]' must be ordered"),
])
def test_validation_names_record_and_key(mutate, message):
  record, _, _ = make_record(5)
  mutate(record)
  with pytest.raises(records.RecordError, match=message) as info:
    records.encode_record(record)
  assert "synthetic/5" in str(info.value)


def test_ground_truth_mask_is_union_and_empty_for_no_target():
  record, left, right = make_record(1)
  np.testing.assert_array_equal(records.ground_truth_mask(record, record["refs"][0]), left)
  np.testing.assert_array_equal(records.ground_truth_mask(record, record["refs"][1]), left | right)
  empty = records.ground_truth_mask(record, record["refs"][2])
  assert empty.shape == (12, 16) and not empty.any()


def test_write_split_sample_table_index_and_ids(tmp_path):
  made = [make_record(i, num_sentences=(1 + i % 2, 1, 2)) for i in range(5)]
  index = records.write_split((r for r, _, _ in made), str(tmp_path), num_shards=2, dataset="synthetic",
                              split="val", skipped={"missing_image": 1})
  assert sorted(os.listdir(tmp_path)) == sorted([
      "records-00000-of-00002.array_record", "records-00001-of-00002.array_record",
      "records-00000-of-00002.array_record.summary.json", "records-00001-of-00002.array_record.summary.json",
      "sample_table.npy", "index.json"])
  expected_samples = sum((1 + i % 2) + 1 + 2 for i in range(5))
  assert index["num_images"] == 5 and index["num_refs"] == 15 and index["num_masks"] == 10
  assert index["num_samples"] == expected_samples
  assert index["records_per_shard"] == [3, 2]
  assert index["granularity_samples"] == {"multi-object": 5, "no-target": 10, "object": 7}
  assert index["skipped_bad"] == {"missing_image": 1}
  assert index["proposals"] == {"sources": {"test detector": 5}, "object_boxes": 5, "part_boxes": 0}
  assert json.load(open(tmp_path / "index.json")) == index

  source = records.SplitSource(str(tmp_path))
  assert len(source) == expected_samples and source.num_records == 5
  # Round-robin: shard 0 holds records 0, 2, 4 and shard 1 holds 1, 3, in that concatenated order.
  assert [source.record(i)["image_id"] for i in range(5)] == [0, 2, 4, 1, 3]
  seen = set()
  for i in range(len(source)):
    sample = source.sample(i)
    ids = sample["ids"]
    assert ids["sent_id"] == sample["sentence"]["sent_id"] and ids["ref_id"] == sample["ref"]["ref_id"]
    assert ids["sent_id"] // 100 == ids["image_id"] and ids["ref_id"] // 10 == ids["image_id"]
    assert ids["dataset"] == "synthetic" and ids["split"] == "val"
    seen.add((ids["ref_id"], ids["sent_id"]))
  all_pairs = {(ref["ref_id"], s["sent_id"]) for r, _, _ in made for ref in r["refs"] for s in ref["sentences"]}
  assert seen == all_pairs


def test_corrupt_record_names_file_and_index(tmp_path):
  from array_record.python import array_record_module

  record, _, _ = make_record(0)
  good = records.encode_record(record)
  broken = msgpack.packb({"dataset": "synthetic"}, use_bin_type=True)
  path = tmp_path / records.shard_name(0, 1)
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for data in (good, good[: len(good) // 2], broken):
    writer.write(data)
  writer.close()
  summary = {"shard": path.name, "skipped": {},
             "records": [{"image_id": 0, "num_annotations": 2, "sentences_per_ref": [1], "ref_granularities":
                          ["object"]}] * 3}
  summary_path = tmp_path / (path.name + records.SHARD_SUMMARY_SUFFIX)
  summary_path.write_text(json.dumps(summary))
  with pytest.raises(records.RecordError, match="has no 'proposal_source'.*prepare it again"):
    records.finalize_split(str(tmp_path), 1)  # a summary written before records named their proposal source
  for record_summary in summary["records"]:
    record_summary.update(proposal_source=records.NO_BOXES_SOURCE, proposal_counts=[0, 0])
  summary_path.write_text(json.dumps(summary))
  records.finalize_split(str(tmp_path), 1)
  source = records.SplitSource(str(tmp_path))
  assert source.record(0)["image_id"] == 0
  with pytest.raises(records.RecordError, match=r"records-00000-of-00001.array_record\[1\]: corrupt"):
    source.record(1)
  with pytest.raises(records.RecordError, match=r"array_record\[2\]: key 'image_id' missing"):
    source.record(2)


def test_truncated_shard_is_named(tmp_path):
  made = [make_record(i)[0] for i in range(3)]
  records.write_split(made, str(tmp_path), num_shards=1)
  path = tmp_path / records.shard_name(0, 1)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 3])
  with pytest.raises(records.RecordError, match="records-00000-of-00001.array_record"):
    records.SplitSource(str(tmp_path))


def test_shards_hold_the_schema_bytes_and_nothing_else(tmp_path):
  """The one on-disk format: each shard entry is `record_schema.encode_record(record)`, in round-robin order."""
  import grain

  from unires_jax.data import record_schema

  made = [make_record(i)[0] for i in range(3)]
  records.write_split(made, str(tmp_path), num_shards=2)
  raw = grain.sources.ArrayRecordDataSource([str(tmp_path / records.shard_name(k, 2)) for k in range(2)])
  assert [raw[i] for i in range(len(raw))] == [record_schema.encode_record(made[j]) for j in (0, 2, 1)]
  assert records.RecordError is record_schema.RecordError  # the schema's names, re-exported for callers
