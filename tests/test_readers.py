"""Readers: hand-written tiny files in each layout, malformed input, the synthetic set, and the record round trip."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from unires_jax.data import readers, records, synthetic
from unires_jax.data import datasets

H, W = 20, 30
POLY_A = [[2, 2, 12, 2, 12, 10, 2, 10], [20, 12, 27, 12, 24, 18]]  # two polygons: a square and a triangle
POLY_B = [[14, 3, 19, 3, 19, 9, 14, 9]]


def _coco_mask(segmentation) -> np.ndarray:
  """pycocotools' own decoding of a COCO segmentation: the reference for the readers."""
  if isinstance(segmentation, list):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, H, W))).astype(bool)
  return mask_utils.decode(mask_utils.frPyObjects(segmentation, H, W)).astype(bool)


def _uncompressed_rle():
  mask = np.zeros((H, W), np.uint8)
  mask[12:19, 3:9] = 1
  flat = mask.flatten(order="F")
  counts, value, run = [], 0, 0
  for pixel in flat:
    if pixel != value:
      counts.append(run)
      value, run = pixel, 0
    run += 1
  counts.append(run)
  return {"size": [H, W], "counts": counts}


def _write_image(folder, name):
  os.makedirs(folder, exist_ok=True)
  Image.new("RGB", (W, H), (1, 2, 3)).save(os.path.join(folder, name))


def _instances():
  return {
      "images": [{"id": 7, "file_name": "img7.png", "height": H, "width": W},
                 {"id": 8, "file_name": "img8.png", "height": H, "width": W}],
      "annotations": [
          {"id": 70, "image_id": 7, "category_id": 1, "segmentation": POLY_A, "bbox": [2, 2, 25, 16]},
          {"id": 71, "image_id": 7, "category_id": 2, "segmentation": POLY_B, "bbox": [14, 3, 5, 6]},
          {"id": 72, "image_id": 7, "category_id": 2, "segmentation": _uncompressed_rle(), "bbox": [3, 12, 6, 7]},
          {"id": 80, "image_id": 8, "category_id": 1, "segmentation": POLY_B, "bbox": [14, 3, 5, 6]},
      ],
      "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
  }


def _sentences(*pairs):
  return [{"sent_id": s, "sent": text, "raw": text, "tokens": text.split()} for s, text in pairs]


@pytest.fixture
def refer_dir(tmp_path):
  folder = tmp_path / "refcoco"
  _write_image(folder / "images", "img7.png")
  _write_image(folder / "images", "img8.png")
  (folder / "instances.json").write_text(json.dumps(_instances()))
  refs = [
      {"ref_id": 5, "ann_id": 70, "image_id": 7, "category_id": 1, "split": "val",
       "sentences": _sentences((50, "the dog"), (51, "left dog")), "sent_ids": [50, 51]},
      {"ref_id": 6, "ann_id": 72, "image_id": 7, "category_id": 2, "split": "val",
       "sentences": _sentences((60, "bottom cat")), "sent_ids": [60]},
      {"ref_id": 9, "ann_id": 80, "image_id": 8, "category_id": 1, "split": "train",
       "sentences": _sentences((90, "a dog")), "sent_ids": [90]},
  ]
  with open(folder / "refs(unc).p", "wb") as f:
    pickle.dump(refs, f, protocol=2)
  return folder


@pytest.fixture
def grefcoco_dir(tmp_path):
  folder = tmp_path / "grefcoco"
  _write_image(folder / "images", "img7.png")
  (folder / "instances.json").write_text(json.dumps(_instances()))
  grefs = [
      {"ref_id": 1, "ann_id": [70, 71, 72], "image_id": 7, "category_id": [1, 2, 2], "split": "val",
       "no_target": False, "sentences": _sentences((10, "all animals"))},
      {"ref_id": 2, "ann_id": [-1], "image_id": 7, "category_id": [-1], "split": "val", "no_target": True,
       "sentences": _sentences((20, "the horse"))},
      {"ref_id": 3, "ann_id": [71], "image_id": 7, "category_id": [2], "split": "val", "no_target": False,
       "sentences": _sentences((30, "the cat"))},
  ]
  (folder / "grefs(unc).json").write_text(json.dumps(grefs))
  return folder


def _read(name, folder, split, **options):
  return list(datasets.DATASETS.lookup(name)(str(folder), split, **options))


def test_refer_masks_boxes_and_ids(refer_dir):
  found = _read("refcoco", refer_dir, "val")
  assert len(found) == 1
  record = found[0]
  records.validate_record(record, "test")
  assert record["dataset"] == "refcoco" and record["image_id"] == 7 and (record["height"], record["width"]) == (H, W)
  assert record["image_bytes"] == (refer_dir / "images" / "img7.png").read_bytes()
  by_ref = {ref["ref_id"]: ref for ref in record["refs"]}
  assert by_ref[5]["sentences"] == [{"sent_id": 50, "sent": "the dog"}, {"sent_id": 51, "sent": "left dog"}]
  assert all(ref["granularity"] == "object" and ref["split"] == "val" for ref in record["refs"])
  np.testing.assert_array_equal(records.ground_truth_mask(record, by_ref[5]), _coco_mask(POLY_A))
  np.testing.assert_array_equal(records.ground_truth_mask(record, by_ref[6]), _coco_mask(_uncompressed_rle()))
  boxes = {a["ann_id"]: a["bbox"] for a in record["annotations"]}
  assert boxes[71] == [14.0, 3.0, 19.0, 9.0]
  # Readers never copy ground-truth boxes into proposals: a proposal source fills them (scripts/prepare_data.py).
  assert record["proposals"] == records.empty_proposals() and record["proposals"]["source"] == "none (no boxes)"
  assert [r["image_id"] for r in _read("refcoco", refer_dir, "train")] == [8]


def test_grefcoco_multi_target_union_and_no_target(grefcoco_dir):
  (record,) = _read("grefcoco", grefcoco_dir, "val")
  by_ref = {ref["ref_id"]: ref for ref in record["refs"]}
  assert [by_ref[i]["granularity"] for i in (1, 2, 3)] == ["multi-object", "no-target", "object"]
  union = _coco_mask(POLY_A) | _coco_mask(POLY_B) | _coco_mask(_uncompressed_rle())
  np.testing.assert_array_equal(records.ground_truth_mask(record, by_ref[1]), union)
  assert by_ref[2]["ann_ids"] == [] and not records.ground_truth_mask(record, by_ref[2]).any()
  np.testing.assert_array_equal(records.ground_truth_mask(record, by_ref[3]), _coco_mask(POLY_B))


def test_cris_png_masks_and_part_granularity(tmp_path):
  folder = tmp_path / "cris"
  _write_image(folder / "images", "COCO_train2014_000000000042.jpg")
  os.makedirs(folder / "masks" / "refcocom")
  os.makedirs(folder / "anns" / "refcocom")
  rng = np.random.default_rng(0)
  masks = {}
  for segment_id in (301, 302):
    masks[segment_id] = rng.random((H, W)) > 0.6
    Image.fromarray(masks[segment_id].astype(np.uint8) * 255).save(folder / "masks" / "refcocom" /
                                                                  f"{segment_id}.png")
  entries = [
      {"bbox": [1, 2, 10, 12], "cat": "dog", "segment_id": 301, "img_name": "COCO_train2014_000000000042.jpg",
       "sentences": [{"idx": 0, "sent_id": 3010, "sent": "the dog"}], "sentences_num": 1},
      {"bbox": [3, 4, 8, 9], "cat": "head", "segment_id": 302, "img_name": "COCO_train2014_000000000042.jpg",
       "sentences": [{"idx": 0, "sent_id": 3020, "sent": "the dog's head"},
                     {"idx": 1, "sent_id": 3021, "sent": "head of the dog"}], "sentences_num": 2},
  ]
  (folder / "anns" / "refcocom" / "val.json").write_text(json.dumps(entries))
  (record,) = _read("refcocom_cris", folder, "val", part_categories=("head",))
  assert record["image_id"] == 42 and record["dataset"] == "refcocom"
  by_ref = {ref["ref_id"]: ref for ref in record["refs"]}
  assert by_ref[301]["granularity"] == "object" and by_ref[302]["granularity"] == "part"
  assert [s["sent_id"] for s in by_ref[302]["sentences"]] == [3020, 3021]
  for segment_id, mask in masks.items():
    np.testing.assert_array_equal(records.ground_truth_mask(record, by_ref[segment_id]), mask)
  boxes = {a["ann_id"]: (a["granularity"], a["bbox"]) for a in record["annotations"]}
  assert boxes == {301: ("object", [1.0, 2.0, 10.0, 12.0]), 302: ("part", [3.0, 4.0, 8.0, 9.0])}
  assert record["proposals"] == records.empty_proposals()


def test_mres_rle_and_captions(tmp_path):
  folder = tmp_path / "mres"
  _write_image(folder / "images", "sa_5.jpg")
  mask = np.zeros((H, W), np.uint8)
  mask[4:9, 6:20] = 1
  rle = mask_utils.encode(np.asfortranarray(mask))
  content = {"image": {"image_id": 5, "file_name": "sa_5.jpg", "height": H, "width": W}, "annotations": [
      {"id": 11, "category": "car", "granularity": "object", "parent_id": None, "bbox": [6, 4, 14, 5],
       "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
       "captions": [{"caption_id": 110, "text": "a red car"}]},
      {"id": 12, "category": "car wheel", "granularity": "part", "parent_id": 11, "bbox": [2, 2, 6, 4],
       "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]], "captions": [{"caption_id": 120, "text": "the wheel"}]},
      {"id": 13, "category": "car door", "granularity": "part", "parent_id": 11, "bbox": [1, 1, 1, 1],
       "segmentation": [[1, 1, 2, 1, 2, 2]], "captions": []},
  ]}
  os.makedirs(folder / "annotations" / "train")
  (folder / "annotations" / "train" / "5.json").write_text(json.dumps(content))
  (record,) = _read("mres32m", folder, "train")
  assert [(r["ref_id"], r["granularity"]) for r in record["refs"]] == [(11, "object"), (12, "part")]
  assert len(record["annotations"]) == 3  # an uncaptioned annotation stays as a mask, not a ref
  np.testing.assert_array_equal(records.ground_truth_mask(record, record["refs"][0]), mask.astype(bool))
  np.testing.assert_array_equal(records.ground_truth_mask(record, record["refs"][1]),
                                _coco_mask([[2, 2, 8, 2, 8, 6, 2, 6]]))


@pytest.mark.parametrize("breakage, kind, message", [
    ("missing_image", "missing_image", r"instances.json image 7: image .*img7.png missing"),
    ("unknown_annotation", "unknown_annotation", r"refs\(unc\).p entry 1: ann_id 999 not in"),
    ("empty_polygon", "empty_polygon", r"annotations\[0\] \(id 70\): segmentation needs polygons"),
    ("missing_key", "missing_key", r"refs\(unc\).p entry 1: 'sentences' missing"),
])
def test_malformed_refer_input_is_named_or_counted(refer_dir, breakage, kind, message):
  refs = pickle.loads((refer_dir / "refs(unc).p").read_bytes())
  instances = json.loads((refer_dir / "instances.json").read_text())
  if breakage == "missing_image":
    os.remove(refer_dir / "images" / "img7.png")
  elif breakage == "unknown_annotation":
    refs[1]["ann_id"] = 999
  elif breakage == "empty_polygon":
    instances["annotations"][0]["segmentation"] = [[]]
  elif breakage == "missing_key":
    del refs[1]["sentences"]
  (refer_dir / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
  (refer_dir / "instances.json").write_text(json.dumps(instances))
  with pytest.raises(readers.MalformedEntryError, match=message):
    _read("refcoco", refer_dir, "val")
  bad = readers.BadEntries()
  kept = _read("refcoco", refer_dir, "val", skip_bad=True, bad=bad)
  assert bad.counts[kind] == 1
  kept_refs = [ref["ref_id"] for record in kept for ref in record["refs"]]
  expected = {"missing_image": [], "unknown_annotation": [5], "empty_polygon": [6], "missing_key": [5]}[breakage]
  assert kept_refs == expected


def test_cris_missing_key_names_file_and_entry(tmp_path):
  folder = tmp_path / "cris"
  os.makedirs(folder / "anns" / "refcocom")
  (folder / "anns" / "refcocom" / "val.json").write_text(json.dumps([{"img_name": "a_1.jpg", "bbox": [0, 0, 1, 1],
                                                                       "cat": "x", "sentences": []}]))
  with pytest.raises(readers.MalformedEntryError, match=r"anns/refcocom/val.json entry 0: 'segment_id' missing"):
    _read("refcocom_cris", folder, "val")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("synthetic")), num_images=6, seed=1)


def test_synthetic_through_every_reader_and_layouts_agree(synthetic_dir):
  masks = {}  # (image_id, ann_id) -> mask from the MRES layout
  for record in _read("synthetic_mres", synthetic_dir, "train"):
    for ann in record["annotations"]:
      masks[(record["image_id"], ann["ann_id"])] = records.ground_truth_mask(record, {"ann_ids": [ann["ann_id"]],
                                                                                      "ref_id": 0})
  granularities = set()
  for name in ("synthetic_refer", "synthetic_grefcoco", "synthetic_cris"):
    found = _read(name, synthetic_dir, "train")
    assert found
    for record in found:
      records.validate_record(record, name)
      for ref in record["refs"]:
        granularities.add(ref["granularity"])
        expected = np.zeros((record["height"], record["width"]), bool)
        for ann_id in ref["ann_ids"]:
          expected |= masks[(record["image_id"], ann_id)]
        np.testing.assert_array_equal(records.ground_truth_mask(record, ref), expected)
  assert granularities == {"object", "multi-object", "part", "no-target"}


def test_shards_partition_the_records(synthetic_dir):
  reader = datasets.DATASETS.lookup("synthetic_grefcoco")
  full = [r["image_id"] for r in reader(synthetic_dir, "train")]
  shards = [[r["image_id"] for r in reader(synthetic_dir, "train", shard=(k, 2))] for k in range(2)]
  assert sorted(shards[0] + shards[1]) == sorted(full) and shards[0] == full[0::2] and shards[1] == full[1::2]


def test_ids_survive_readers_records_split_source(synthetic_dir, tmp_path):
  reader = datasets.DATASETS.lookup("synthetic_grefcoco")
  found = list(reader(synthetic_dir, "train"))
  records.write_split(found, str(tmp_path), num_shards=2, dataset="synthetic", split="train")
  source = records.SplitSource(str(tmp_path))
  grefs = json.load(open(os.path.join(synthetic_dir, "grefcoco", "grefs(unc).json")))
  expected = {(r["ref_id"], s["sent_id"]): (r["image_id"], r["split"]) for r in grefs if r["split"] == "train"
              for s in r["sentences"]}
  seen = {}
  for i in range(len(source)):
    ids = source.sample(i)["ids"]
    seen[(ids["ref_id"], ids["sent_id"])] = (ids["image_id"], ids["split"])
    assert ids["dataset"] == "synthetic"
  assert seen == expected and len(source) == len(expected)


def test_an_exif_rotated_image_gets_upright_size_masks_and_boxes(refer_dir):
  """The annotations of a phone photo (stored landscape, EXIF 'rotate 90° clockwise') are on the stored pixels;
  the record holds the upright image's size, and its masks and boxes turn with the pixels."""
  from unires_jax.data import images, pipeline
  (plain,) = _read("refcoco", refer_dir, "val")
  stored = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[images.EXIF_ORIENTATION_TAG] = 6
  Image.fromarray(stored).save(refer_dir / "images" / "img7.png", exif=exif.tobytes())
  (turned,) = _read("refcoco", refer_dir, "val")
  records.validate_record(turned, "test")
  assert (turned["height"], turned["width"]) == (W, H)
  np.testing.assert_array_equal(pipeline.decode_image(turned), np.rot90(stored, -1))
  for ref_plain, ref_turned in zip(plain["refs"], turned["refs"]):
    np.testing.assert_array_equal(records.ground_truth_mask(turned, ref_turned),
                                  np.rot90(records.ground_truth_mask(plain, ref_plain), -1))
  boxes = {a["ann_id"]: a["bbox"] for a in turned["annotations"]}
  assert boxes[71] == [H - 9.0, 14.0, H - 3.0, 19.0]  # (14, 3, 19, 9) turned clockwise on a 20-high image


def test_a_truncated_image_is_named_or_counted(refer_dir):
  path = refer_dir / "images" / "img7.png"
  big = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
  Image.fromarray(big).save(path)
  path.write_bytes(path.read_bytes()[:120])
  with pytest.raises(readers.MalformedEntryError, match=r"instances.json image 7: image .*img7.png.*cannot be decoded"):
    _read("refcoco", refer_dir, "val")
  bad = readers.BadEntries()
  assert _read("refcoco", refer_dir, "val", skip_bad=True, bad=bad) == []
  assert bad.counts == {"bad_image": 1} and "img7.png" in bad.messages[0]


@pytest.mark.parametrize("box, message", [([float("nan"), 0, 1, 1], "finite numbers"), ([5, 0, 1, 1], "x1 < x0"),
                                          (["a", 0, 1, 1], "finite numbers")])
def test_cris_bad_boxes_name_the_entry(tmp_path, box, message):
  folder = tmp_path / "cris"
  os.makedirs(folder / "anns" / "refcocom")
  entry = {"img_name": "a_1.jpg", "segment_id": 3, "bbox": box, "cat": "x", "sentences": [{"sent_id": 1, "sent": "a"}]}
  (folder / "anns" / "refcocom" / "val.json").write_text(json.dumps([entry]))
  with pytest.raises(readers.MalformedEntryError, match=rf"anns/refcocom/val.json entry 0: bbox .*{message}"):
    _read("refcocom_cris", folder, "val")


def test_the_refer_data_root_and_its_image_folder_are_found(refer_dir, tmp_path):
  """The refer toolkit's layout: <root>/refcoco/{instances.json, refs(unc).p}, images in
  <root>/images/mscoco/images/train2014/. Either the root or the dataset folder may be given."""
  import shutil
  root = tmp_path / "refer_data"
  shutil.copytree(refer_dir, root / "refcoco", ignore=shutil.ignore_patterns("images"))
  shutil.copytree(refer_dir / "images", root / "images" / "mscoco" / "images" / "train2014")
  (expected,) = _read("refcoco", refer_dir, "val")
  for data_dir in (root, root / "refcoco"):
    (record,) = _read("refcoco", data_dir, "val")
    assert record["image_bytes"] == expected["image_bytes"] and record["refs"] == expected["refs"]
  sources = datasets.DATASETS.lookup("refcoco").source_files(str(root), "val")
  assert sources == [str(root / "refcoco" / "instances.json"), str(root / "refcoco" / "refs(unc).p")]
  shutil.rmtree(root / "images")
  with pytest.raises(FileNotFoundError) as caught:
    _read("refcoco", root, "val")
  message = str(caught.value)
  assert "img7.png" in message and str(root / "images" / "mscoco" / "images" / "train2014") in message
  assert str(root / "refcoco" / "images") in message and "--image-dir" in message
  with pytest.raises(FileNotFoundError, match=r"refs\(unc\).p not found; looked for .*nowhere.*nowhere/refcoco"):
    _read("refcoco", tmp_path / "nowhere", "val")
