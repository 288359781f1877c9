"""The `detections` source: COCO detection-results files read, filtered, matched, counted, and bad entries named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import common
from unires_jax import proposals
from unires_jax.data import records
from unires_jax.proposals import detections


def _image(image_id=1, file_name="a.jpg", height=50, width=80, split="val") -> proposals.ImageInput:
  def pixels():
    raise AssertionError("the detections source never decodes pixels")
  return proposals.ImageInput(image_id=image_id, file_name=file_name, height=height, width=width, pixels=pixels,
                              split=split)


def _write(path, entries) -> str:
  path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
  return str(path)


def _source(object_file="", part_file="", **options):
  config = common.proposals_config("detections")
  config.detections.object_file = object_file
  config.detections.part_file = part_file
  for key, value in options.items():
    config.detections[key] = value
  return proposals.build_source(config)


OBJECTS = [
    {"image_id": 1, "bbox": [10, 5, 20, 10], "score": 0.5, "category_id": 3},
    {"image_id": 1, "bbox": [0, 0, 30, 40], "score": 0.9},
    {"image_id": 2, "bbox": [1, 1, 2, 2], "score": 0.7},
    {"image_id": 1, "bbox": [5, 5, 5, 5], "score": 0.2},
    {"image_id": 99, "bbox": [1, 1, 2, 2], "score": 0.7},
    {"image_id": 98, "bbox": [1, 1, 2, 2], "score": 0.1},
]
PARTS = [{"image_id": 1, "bbox": [12.5, 6, 4, 3.5], "score": 0.8}]


def test_good_file_boxes_are_xyxy_sorted_by_score_with_scores(tmp_path):
  source = _source(_write(tmp_path / "obj.json", OBJECTS), _write(tmp_path / "part.json", PARTS))
  assert not source.is_ground_truth
  first, second, third = source([_image(1), _image(2, "b.jpg"), _image(3, "c.jpg")])
  np.testing.assert_array_equal(first.object_boxes, [[0, 0, 30, 40], [10, 5, 30, 15], [5, 5, 10, 10]])
  np.testing.assert_allclose(first.object_scores, [0.9, 0.5, 0.2])
  np.testing.assert_array_equal(first.part_boxes, [[12.5, 6, 16.5, 9.5]])
  np.testing.assert_allclose(first.part_scores, [0.8])
  np.testing.assert_array_equal(second.object_boxes, [[1, 1, 3, 3]])
  assert second.part_boxes.shape == (0, 4) and second.part_scores.shape == (0,)
  # An image without detections has no proposals.
  assert third.object_boxes.shape == (0, 4) and third.part_boxes.shape == (0, 4)
  assert first.object_boxes.dtype == np.float32 and first.object_scores.dtype == np.float32
  assert source.describe() == (f"detections (objects {tmp_path}/obj.json, parts {tmp_path}/part.json; score >= 0, "
                               f"all per image, match by image_id)")


def test_threshold_and_top_k_and_their_counts(tmp_path):
  path = _write(tmp_path / "obj.json", OBJECTS)
  (kept,) = _source(path, score_threshold=0.3)([_image(1)])
  np.testing.assert_allclose(kept.object_scores, [0.9, 0.5])  # 0.2 < 0.3 dropped; >= keeps 0.5
  (kept,) = _source(path, score_threshold=0.5)([_image(1)])
  np.testing.assert_allclose(kept.object_scores, [0.9, 0.5])
  source = _source(path, top_k=2)
  (kept,) = source([_image(1)])
  np.testing.assert_array_equal(kept.object_boxes, [[0, 0, 30, 40], [10, 5, 30, 15]])
  counts = source.summary()["object"]
  assert (counts["matched"], counts["beyond_top_k"], counts["kept"], counts["below_threshold"]) == (3, 1, 2, 0)


def test_ties_keep_file_order(tmp_path):
  entries = [{"image_id": 1, "bbox": [i, 0, 1, 1], "score": 0.5} for i in range(5)]
  (found,) = _source(_write(tmp_path / "obj.json", entries))([_image(1)])
  np.testing.assert_array_equal(found.object_boxes[:, 0], [0, 1, 2, 3, 4])


def test_match_by_file_name_base_name_stem_and_path(tmp_path):
  entries = [
      {"image_id": "a.jpg", "bbox": [1, 1, 2, 2], "score": 0.9},
      {"image_id": "photos/a.jpg", "bbox": [2, 2, 2, 2], "score": 0.8},  # reduced to its base name
      {"image_id": "b", "bbox": [3, 3, 2, 2], "score": 0.7},  # the stem of b.png
      {"image_id": 17, "bbox": [4, 4, 2, 2], "score": 0.6},  # an int id is the stem of 17.jpg
      {"image_id": "nothing.jpg", "bbox": [4, 4, 2, 2], "score": 0.6},
  ]
  source = _source(_write(tmp_path / "obj.json", entries), match_by="file_name")
  a, b, seventeen, c = source([_image(0, "a.jpg"), _image(0, "sub/b.png"), _image(0, "17.jpg"), _image(0, "c.jpg")])
  np.testing.assert_array_equal(a.object_boxes, [[1, 1, 3, 3], [2, 2, 4, 4]])
  np.testing.assert_array_equal(b.object_boxes, [[3, 3, 5, 5]])
  np.testing.assert_array_equal(seventeen.object_boxes, [[4, 4, 6, 6]])
  assert c.object_boxes.shape == (0, 4)
  (found,) = source.summary()["object"]["files"].values()
  assert found["unmatched"] == ["nothing.jpg"] and found["ids"] == 4  # 'a.jpg' twice is one id


def test_a_stem_that_matches_two_images_is_refused(tmp_path):
  source = _source(_write(tmp_path / "obj.json", [{"image_id": "a", "bbox": [1, 1, 2, 2], "score": 0.9}]),
                   match_by="file_name")
  with pytest.raises(detections.DetectionFileError, match=r"image_id 'a' matches two images, 'a.jpg' and 'a.png'"):
    source([_image(0, "a.jpg"), _image(1, "a.png")])


def test_match_by_image_id_ignores_file_names(tmp_path):
  entries = [{"image_id": 5, "bbox": [1, 1, 2, 2], "score": 0.9}]
  source = _source(_write(tmp_path / "obj.json", entries))
  (found,) = source([_image(5, "5.jpg")])
  assert len(found.object_boxes) == 1
  (found,) = source([_image(6, "5.jpg")])
  assert len(found.object_boxes) == 0


def test_unmatched_ids_are_counted_and_named(tmp_path):
  path = _write(tmp_path / "obj.json", OBJECTS)
  source = _source(path)
  source([_image(1), _image(3, "c.jpg")])
  summary = source.summary()
  assert summary["object"]["files"] == {path: {"entries": 6, "ids": 4, "unmatched_ids": 3, "unmatched": [2, 98, 99]}}
  assert summary["object"]["images"] == 2 and summary["object"]["images_with_boxes"] == 1
  assert summary["part"]["files"] == {}  # no part file: nothing read
  lines = detections.format_summary(summary)
  assert lines[1] == f"  {path}: 6 entries, 4 ids, 3 ids match no image (first 3: 2, 98, 99)"
  assert lines[0].startswith("object detections: 3 boxes kept on 1 of 2 images")


def test_reports_of_disjoint_images_merge_into_one_summary(tmp_path):
  path = _write(tmp_path / "obj.json", OBJECTS)
  one, two, both = _source(path), _source(path), _source(path)
  one([_image(1)])
  two([_image(2, "b.jpg")])
  both([_image(1), _image(2, "b.jpg")])
  merged = detections.merge_reports([json.loads(json.dumps(one.report())), two.report()])  # survives JSON
  assert one.summary(merged) == both.summary()
  assert both.summary()["object"]["files"][path]["unmatched"] == [98, 99]


def test_boxes_outside_the_image_are_clipped_and_counted(tmp_path):
  entries = [
      {"image_id": 1, "bbox": [-10, 40, 30, 20], "score": 0.9},  # crosses the left and bottom edges
      {"image_id": 1, "bbox": [70, 0, 5, 5], "score": 0.8},  # inside
      {"image_id": 1, "bbox": [100, 10, 5, 5], "score": 0.7},  # right of the image: nothing left
      {"image_id": 1, "bbox": [10, 10, 0, 5], "score": 0.6},  # zero width
  ]
  source = _source(_write(tmp_path / "obj.json", entries))
  (found,) = source([_image(1, height=50, width=80)])
  np.testing.assert_array_equal(found.object_boxes, [[0, 40, 20, 50], [70, 0, 75, 5]])
  counts = source.summary()["object"]
  assert (counts["clipped"], counts["empty"], counts["kept"]) == (2, 2, 2)


def test_split_in_a_path_and_an_empty_path(tmp_path):
  _write(tmp_path / "val_parts.json", [{"image_id": 1, "bbox": [1, 1, 2, 2], "score": 0.9}])
  _write(tmp_path / "test_parts.json", [{"image_id": 1, "bbox": [5, 5, 2, 2], "score": 0.9}])
  source = _source(part_file=str(tmp_path / "{split}_parts.json"))
  val, test = source([_image(1, split="val"), _image(1, split="test")])
  np.testing.assert_array_equal(val.part_boxes, [[1, 1, 3, 3]])
  np.testing.assert_array_equal(test.part_boxes, [[5, 5, 7, 7]])
  assert val.object_boxes.shape == (0, 4)  # no object file: no object boxes
  with pytest.raises(ValueError, match=r"part_file .* names a \{split\}, but image 'a.jpg' has no split"):
    source([_image(1, split="")])
  with pytest.raises(ValueError, match="object_file and part_file are both empty"):
    _source()


BAD_ENTRIES = [
    ({"bbox": [1, 1, 2, 2], "score": 0.5}, "key 'image_id' missing"),
    ({"image_id": 1, "score": 0.5}, "key 'bbox' missing"),
    ({"image_id": 1, "bbox": [1, 1, 2, 2]}, "key 'score' missing"),
    ({"image_id": 1, "bbox": [1, 1, 2], "score": 0.5}, r"'bbox' must be \[x, y, w, h\] \(4 numbers\)"),
    ({"image_id": 1, "bbox": [1, "1", 2, 2], "score": 0.5}, r"'bbox' must be \[x, y, w, h\]"),
    ({"image_id": 1, "bbox": [1, 1, True, 2], "score": 0.5}, r"'bbox' must be \[x, y, w, h\]"),
    ({"image_id": 1, "bbox": [1, 1, -2, 2], "score": 0.5}, "'bbox' has a negative width or height"),
    ({"image_id": 1, "bbox": [1, 1, 2, -0.5], "score": 0.5}, "'bbox' has a negative width or height"),
    ({"image_id": 1, "bbox": [1, 1, 2, 2], "score": "high"}, "'score' must be a finite number"),
    ({"image_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5, "category_id": "dog"}, "'category_id' must be an int"),
    ({"image_id": "1", "bbox": [1, 1, 2, 2], "score": 0.5}, "'image_id' must be an int with match_by='image_id'"),
    ({"image_id": True, "bbox": [1, 1, 2, 2], "score": 0.5}, "'image_id' must be an int"),
    ([1, [1, 1, 2, 2], 0.5], "expected an object"),
]


@pytest.mark.parametrize("entry, message", BAD_ENTRIES)
def test_each_malformed_entry_is_named_with_file_and_entry(tmp_path, entry, message):
  path = _write(tmp_path / "obj.json", OBJECTS[:2] + [entry])
  with pytest.raises(detections.DetectionFileError, match=f"detections file {path} entry 2: {message}"):
    _source(path)([_image(1)])


@pytest.mark.parametrize("text, message", [
    ('[{"image_id": 1, "bbox": [1, NaN, 2, 2], "score": 0.5}]', "entry 0: 'bbox' must be finite"),
    ('[{"image_id": 1, "bbox": [1, 1, Infinity, 2], "score": 0.5}]', "entry 0: 'bbox' must be finite"),
    ('[{"image_id": 1, "bbox": [1, 1, 2, 2], "score": NaN}]', "entry 0: 'score' must be a finite number"),
    ('[\n{"image_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5},\n{"image_id": 1 "bbox": []}\n]',
     "line 3 column 16: invalid JSON"),
    ('{"image_id": 1}', "expected a JSON list of detections, got dict"),
    ("", "line 1 column 1: invalid JSON"),
])
def test_non_finite_values_and_bad_json_are_named(tmp_path, text, message):
  path = _write(tmp_path / "obj.json", text)
  with pytest.raises(detections.DetectionFileError, match=f"detections file {path}:? {message}"):
    _source(path)([_image(1)])


def test_missing_file_and_bad_options_are_named(tmp_path):
  with pytest.raises(detections.DetectionFileError, match=f"detections file {tmp_path}/none.json does not exist"):
    _source(str(tmp_path / "none.json"))([_image(1)])
  path = _write(tmp_path / "obj.json", OBJECTS)
  with pytest.raises(ValueError, match="proposals.detections.match_by 'name'"):
    _source(path, match_by="name")
  with pytest.raises(ValueError, match="proposals.detections.top_k must be an int >= 0"):
    _source(path, top_k=-1)


def test_attach_writes_valid_records_with_the_source(tmp_path):
  from tests.test_records import make_record

  path = _write(tmp_path / "obj.json", [{"image_id": 4, "bbox": [1, 2, 3, 4], "score": 0.6},
                                        {"image_id": 4, "bbox": [10, 2, 30, 40], "score": 0.8}])
  source = _source(path)
  made = [make_record(i)[0] for i in (3, 4)]  # 12x16 images
  out = list(proposals.attach(made, source, decode=lambda record: None, batch_size=1))
  for record in out:
    records.validate_record(record, "test")
    assert record["proposals"]["source"] == source.describe()
  assert out[0]["proposals"]["object"] == [] and out[0]["proposals"]["object_scores"] == []
  assert out[1]["proposals"]["object"] == [[10.0, 2.0, 16.0, 12.0], [1.0, 2.0, 4.0, 6.0]]
  np.testing.assert_allclose(out[1]["proposals"]["object_scores"], [0.8, 0.6])
  assert source.summary()["object"]["clipped"] == 1
