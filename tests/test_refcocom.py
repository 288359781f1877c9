"""RefCOCOm as released: a hand-written release-layout fixture (`annotations/*_part_only.json`,
`*_object_part.json`, `masks/<segment_id>.png`, COCO-named images), its reader, and scripts/eval.py's paper table
(Part, Obj&Part per split) from predictions whose IoUs are chosen by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs.eval import refcocom as refcocom_config
from unires_jax.data import readers, records, refcocom
from unires_jax.data import datasets
from unires_jax.eval import evaluators, predictions as P

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
H, W = 10, 12
IMAGES = {1: "COCO_train2014_000000000001.jpg", 2: "COCO_train2014_000000000002.jpg"}


def _box_mask(rows: slice, cols: slice) -> np.ndarray:
  mask = np.zeros((H, W), bool)
  mask[rows, cols] = True
  return mask


MASKS = {101: _box_mask(slice(0, 5), slice(0, 4)),    # 20 px, a part
         102: _box_mask(slice(5, 10), slice(0, 6)),   # 30 px, a part
         103: _box_mask(slice(0, 10), slice(6, 12)),  # 60 px, an object
         201: _box_mask(slice(2, 6), slice(2, 6)),    # 16 px, a part
         202: _box_mask(slice(0, 10), slice(0, 12))}  # the whole image, an object
IMAGE_OF = {101: 1, 102: 1, 103: 1, 201: 2, 202: 2}


def _entry(segment_id: int, sentences, cat: str = "thing") -> dict:
  return {"img_name": IMAGES[IMAGE_OF[segment_id]], "segment_id": segment_id, "bbox": [0, 0, 4, 5], "cat": cat,
          "sentences": sentences, "sentences_num": len(sentences)}


# The release's six files, four of them here: sentences as CRIS dicts and as plain strings.
SPLIT_FILES = {
    "val_part_only": [_entry(101, [{"idx": 0, "sent_id": 1011, "sent": "the head"},
                                   {"idx": 1, "sent_id": 1012, "sent": "head of the man"}]),
                      _entry(102, ["the left leg"])],
    "val_object_part": [_entry(101, [{"idx": 0, "sent_id": 1013, "sent": "his head"}], cat="head"),
                        _entry(103, [{"idx": 0, "sent_id": 1031, "sent": "the car"}], cat="car"),
                        _entry(202, ["the whole scene"])],
    "testA_part_only": [_entry(201, ["the window", "a small window"])],
    "testA_object_part": [_entry(201, ["the window"]), _entry(202, ["the house"])],
}


def write_release(root) -> str:
  os.makedirs(root / "annotations")
  os.makedirs(root / "masks")
  os.makedirs(root / "images")
  rng = np.random.default_rng(0)
  for name in IMAGES.values():
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / name)
  for segment_id, mask in MASKS.items():
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{segment_id}.png")
  for split, entries in SPLIT_FILES.items():
    (root / "annotations" / f"{split}.json").write_text(json.dumps(entries))
  return str(root)


@pytest.fixture
def release(tmp_path):
  return write_release(tmp_path / "RefCOCOm")


def _records(data_dir, split, **options):
  return list(datasets.DATASETS.lookup("refcocom")(data_dir, split, **options))


def test_part_only_file_reads_as_parts_with_both_sentence_forms(release):
  (record,) = _records(release, "val_part_only")
  assert record["image_id"] == 1 and record["file_name"] == IMAGES[1]
  assert (record["height"], record["width"]) == (H, W)
  by_ref = {ref["ref_id"]: ref for ref in record["refs"]}
  assert sorted(by_ref) == [101, 102]
  assert all(ref["granularity"] == "part" and ref["split"] == "val_part_only" for ref in by_ref.values())
  assert by_ref[101]["sentences"] == [{"sent_id": 1011, "sent": "the head"},
                                      {"sent_id": 1012, "sent": "head of the man"}]
  assert by_ref[102]["sentences"] == [{"sent_id": 0, "sent": "the left leg"}]  # a plain string: its position
  for segment_id in (101, 102):
    np.testing.assert_array_equal(records.ground_truth_mask(record, by_ref[segment_id]), MASKS[segment_id])


def test_object_part_file_marks_parts_by_category_or_flag(release):
  records_by_image = {r["image_id"]: r for r in _records(release, "val_object_part")}
  assert sorted(records_by_image) == [1, 2]
  granularity = {ref["ref_id"]: ref["granularity"] for r in records_by_image.values() for ref in r["refs"]}
  assert granularity == {101: "object", 103: "object", 202: "object"}
  marked = {ref["ref_id"]: ref["granularity"]
            for r in _records(release, "val_object_part", part_categories=("head",)) for ref in r["refs"]}
  assert marked == {101: "part", 103: "object", 202: "object"}


def test_release_split_names_are_checked_and_explained(release):
  with pytest.raises(ValueError, match=r"ships val as \['val_part_only', 'val_object_part'\]"):
    _records(release, "val")
  with pytest.raises(FileNotFoundError, match="testB_part_only.json missing"):
    _records(release, "testB_part_only")
  assert refcocom.parse_release_split("testA_object_part") == ("testA", "Obj&Part")
  with pytest.raises(ValueError, match="not a release split"):
    refcocom.parse_release_split("test_part_only")


def test_duplicate_segment_and_missing_mask_are_named(release):
  path = os.path.join(release, "annotations", "val_part_only.json")
  entries = SPLIT_FILES["val_part_only"]
  with open(path, "w") as f:
    json.dump(entries + [entries[0]], f)
  with pytest.raises(readers.MalformedEntryError, match=r"val_part_only.json entry 2: segment_id 101 already in "
                                                        r"entry 0"):
    _records(release, "val_part_only")
  bad = readers.BadEntries()
  assert len(_records(release, "val_part_only", skip_bad=True, bad=bad)) == 1 and bad.counts == {
      "duplicate_segment": 1}
  with open(path, "w") as f:
    json.dump(entries, f)
  os.remove(os.path.join(release, "masks", "102.png"))
  with pytest.raises(readers.MalformedEntryError, match=r"val_part_only.json entry 1: mask .*masks/102.png missing"):
    _records(release, "val_part_only")


def test_eval_config_selects_benchmark_splits_as_release_files():
  assert refcocom_config.get_config(":val,testA").splits == ["val_part_only", "val_object_part", "testA_part_only",
                                                             "testA_object_part"]
  assert refcocom_config.get_config().splits == list(refcocom.RELEASE_SPLITS)
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['val_part_only'\]"):
    refcocom_config.get_config("val_part_only")


def test_paper_table_takes_part_from_part_only_and_obj_part_from_object_part():
  results = {"val_part_only": {"mIoU/obj&part": 40.0}, "val_object_part": {"mIoU/obj&part": 60.0},
             "testB_object_part": {"mIoU/obj&part": 70.0}}
  table = evaluators.EVALUATORS.lookup("refcocom").paper_table(results)
  assert table["val"] == {"Part": 40.0, "Obj&Part": 60.0}
  assert table["testB"]["Obj&Part"] == 70.0 and np.isnan(table["testB"]["Part"]) and "testA" not in table


# Per sample: (split, segment_id, sent_id) → predicted mask, with the IoU it scores.
HALF_101 = _box_mask(slice(0, 5), slice(0, 2))    # I 10, U 20: 0.5
HALF_103 = _box_mask(slice(0, 10), slice(6, 9))   # I 30, U 60: 0.5
HALF_201 = _box_mask(slice(2, 6), slice(2, 4))    # I 8, U 16: 0.5
EMPTY = np.zeros((H, W), bool)
PREDICTIONS = [("val_part_only", 101, 1011, MASKS[101]),  # 1
               ("val_part_only", 101, 1012, HALF_101),    # 0.5
               ("val_part_only", 102, 0, EMPTY),          # 0      → Part (val) = 50.00
               ("val_object_part", 101, 1013, MASKS[101]),  # 1
               ("val_object_part", 103, 1031, HALF_103),    # 0.5
               ("val_object_part", 202, 0, MASKS[202]),     # 1    → Obj&Part (val) = 83.33
               ("testA_part_only", 201, 0, MASKS[201]),     # 1
               ("testA_part_only", 201, 1, HALF_201),       # 0.5  → Part (testA) = 75.00
               ("testA_object_part", 201, 0, MASKS[201]),   # 1
               ("testA_object_part", 202, 0, EMPTY)]        # 0    → Obj&Part (testA) = 50.00


def test_eval_script_prints_the_paper_table(release, tmp_path):
  path = tmp_path / "predictions.jsonl"
  P.write_predictions(str(path), [P.Prediction.from_mask("refcocom", split, ref_id, sent_id, mask)
                                  for split, ref_id, sent_id, mask in PREDICTIONS])
  out = tmp_path / "report"
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "eval.py"), "--config",
       os.path.join(ROOT, "configs", "eval", "refcocom.py") + ":val,testA", f"--config.predictions={path}",
       f"--config.data_dir={release}", f"--config.output_dir={out}"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "| split | Part | Obj&Part |" in result.stdout
  assert "| val | 50.00 | 83.33 |" in result.stdout and "| testA | 75.00 | 50.00 |" in result.stdout
  report = json.loads((out / "metrics.json").read_text())
  assert report["paper_table"]["val"] == {"Part": pytest.approx(50.0), "Obj&Part": pytest.approx(250 / 3)}
  assert report["paper_table"]["testA"] == {"Part": pytest.approx(75.0), "Obj&Part": pytest.approx(50.0)}
  assert report["splits"]["val_part_only"]["counts"]["samples"] == 3
  assert report["made_with"]["box_source"].startswith("unknown")  # another model's file, no sidecar
  assert "| val | 50.00 | 83.33 |" in (out / "metrics.md").read_text()
