"""scripts/propose.py: COCO results for a prepared split or a folder, read back by the detections source; resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from scripts import propose
from unires_jax import proposals
from unires_jax.data import records, synthetic
from unires_jax.data import datasets


class Interrupted(Exception):
  pass


@proposals.SOURCES.register("test_pixels")
class PixelBoxes:
  """A fake source that reads the pixels: one object box (the top-left quarter) scored by the image's mean, one
  part box; it counts the images it saw and can stop after `stop_after` images, like a killed run."""
  is_ground_truth = False
  seen: list[str] = []
  stop_after: int | None = None

  def __init__(self, config):
    del config

  def describe(self) -> str:
    return "test pixels"

  def __call__(self, images):
    out = []
    for image in images:
      if PixelBoxes.stop_after is not None and len(PixelBoxes.seen) >= PixelBoxes.stop_after:
        raise Interrupted()
      PixelBoxes.seen.append(image.file_name)
      pixels = image.pixels()
      assert pixels.shape == (image.height, image.width, 3)
      score = float(pixels.mean()) / 255
      out.append(proposals.ImageProposals(
          np.array([[0, 0, image.width / 2, image.height / 2]], np.float32),
          np.array([[1, 1, 3.5, 4.25]], np.float32), np.array([score], np.float32), np.array([0.5], np.float32)))
    return out


@pytest.fixture(autouse=True)
def _reset_fake_source():
  PixelBoxes.seen, PixelBoxes.stop_after = [], None
  yield


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("propose")
  data_dir = synthetic.ensure_synthetic(str(root / "synthetic"), num_images=10, seed=3)
  out = str(root / "cris_train")
  records.write_split(datasets.DATASETS.lookup("synthetic_cris")(data_dir, "train"), out, num_shards=2)
  return out


@pytest.fixture
def image_dir(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name, size in (("b.png", (20, 30)), ("a.jpg", (16, 12)), ("c.PNG", (10, 10)), ("d.png", (8, 14))):
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / name)
  (folder / "notes.txt").write_text("not an image")
  return str(folder)


def _run(inputs_flag, inputs, out_dir, *overrides):
  out_dir = str(out_dir)
  figures = propose.main(["propose.py", inputs_flag, inputs, "--out-objects", f"{out_dir}/objects.json",
                          "--out-parts", f"{out_dir}/parts.json", "--config.progress=False", *overrides])
  return figures, json.load(open(f"{out_dir}/objects.json")), json.load(open(f"{out_dir}/parts.json"))


def test_annotations_on_the_synthetic_split_round_trip_through_the_detections_source(split_dir, tmp_path):
  figures, objects, parts = _run("--split-dir", split_dir, tmp_path, "--config.proposals.source=annotations",
                                 "--config.batch_size=3")
  split = records.SplitSource(split_dir)
  expected_objects, expected_parts = [], []
  for k in range(split.num_records):
    record = split.record(k)
    for ann in record["annotations"]:
      x0, y0, x1, y1 = (float(v) for v in np.float32(ann["bbox"]))  # sources give float32 boxes
      entry = {"image_id": record["image_id"], "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 1.0, "category_id": 1}
      (expected_objects if ann["granularity"] == "object" else expected_parts).append(entry)
  assert expected_parts and objects == expected_objects and parts == expected_parts
  assert figures["images"] == figures["computed"] == split.num_records and figures["resumed"] == 0
  assert figures["source"] == records.GT_BOXES_SOURCE and figures["match_by"] == "image_id"
  assert not os.path.exists(f"{tmp_path}/objects.json{propose.PROGRESS_SUFFIX}")

  # The detections source reading these files gives back the annotations source's boxes, image by image.
  config = common.proposals_config("detections")
  config.detections.object_file, config.detections.part_file = f"{tmp_path}/objects.json", f"{tmp_path}/parts.json"
  made = [split.record(k) for k in range(split.num_records)]
  from_files = list(proposals.attach(made, proposals.build_source(config), decode=None))
  from_annotations = list(proposals.attach(made, proposals.SOURCES.lookup("annotations")(None), decode=None))
  for a, b in zip(from_files, from_annotations):
    for kind in ("object", "part", "object_scores", "part_scores"):
      assert a["proposals"][kind] == b["proposals"][kind]


def test_a_folder_of_images_is_named_by_file_name(image_dir, tmp_path):
  figures, objects, parts = _run("--images", image_dir, tmp_path, "--config.proposals.source=test_pixels")
  assert PixelBoxes.seen == ["a.jpg", "b.png", "c.PNG", "d.png"]  # sorted, the .txt skipped
  assert [o["image_id"] for o in objects] == PixelBoxes.seen
  assert objects[1]["bbox"] == [0.0, 0.0, 15.0, 10.0]  # b.png is 30 wide, 20 high
  assert parts[0] == {"image_id": "a.jpg", "bbox": [1.0, 1.0, 2.5, 3.25], "score": 0.5, "category_id": 1}
  assert figures["match_by"] == "file_name"
  pixels = np.asarray(Image.open(os.path.join(image_dir, "b.png")).convert("RGB"))
  assert objects[1]["score"] == pytest.approx(pixels.mean() / 255, abs=1e-6)
  # Read back with match_by='file_name': the same boxes for the same images.
  config = common.proposals_config("detections", detections=dict(
      object_file=f"{tmp_path}/objects.json", part_file=f"{tmp_path}/parts.json", score_threshold=0.0, top_k=0,
      match_by="file_name"))
  inputs = propose.folder_inputs(image_dir)
  found = proposals.build_source(config)([proposals.ImageInput(i, inputs.record(i)["file_name"],
                                                               inputs.record(i)["height"], inputs.record(i)["width"],
                                                               pixels=lambda: None) for i in range(4)])
  np.testing.assert_array_equal(found[1].object_boxes, [[0, 0, 15, 10]])
  np.testing.assert_array_equal(found[0].part_boxes, [[1, 1, 3.5, 4.25]])


def test_an_interrupted_run_resumes_and_writes_the_same_files(split_dir, tmp_path):
  whole = tmp_path / "whole"
  _, objects, parts = _run("--split-dir", split_dir, whole, "--config.proposals.source=test_pixels",
                           "--config.batch_size=2")
  count = len(PixelBoxes.seen)
  assert count >= 4

  resumed = tmp_path / "resumed"
  PixelBoxes.seen, PixelBoxes.stop_after = [], 3  # killed during the second batch
  with pytest.raises(Interrupted):
    _run("--split-dir", split_dir, resumed, "--config.proposals.source=test_pixels", "--config.batch_size=2")
  progress = resumed / ("objects.json" + propose.PROGRESS_SUFFIX)
  lines = progress.read_text().splitlines()
  assert len(lines) == 1 + 2 and not (resumed / "objects.json").exists()  # header + the first batch
  with open(progress, "a") as f:
    f.write('{"position": 2, "id": 1')  # a line cut by the interruption: dropped and redone
  with pytest.raises(propose.ProposeError, match="was written for 'test pixels' .* not 'annotations"):
    _run("--split-dir", split_dir, resumed, "--config.proposals.source=annotations")
  PixelBoxes.seen, PixelBoxes.stop_after = [], None
  figures, resumed_objects, resumed_parts = _run("--split-dir", split_dir, resumed,
                                                 "--config.proposals.source=test_pixels", "--config.batch_size=2")
  assert len(PixelBoxes.seen) == count - 2 and figures["resumed"] == 2 and figures["computed"] == count - 2
  assert resumed_objects == objects and resumed_parts == parts
  assert not progress.exists()


def test_bad_arguments_are_short_errors(split_dir, image_dir, tmp_path):
  with pytest.raises(propose.ProposeError, match="exactly one of --split-dir and --images"):
    propose.main(["propose.py", "--split-dir", split_dir, "--images", image_dir, "--out-objects", "o.json"])
  with pytest.raises(propose.ProposeError, match="--out-objects and/or --out-parts"):
    propose.main(["propose.py", "--images", image_dir])
  with pytest.raises(KeyError, match="unknown proposal source 'detector'"):
    _run("--images", image_dir, tmp_path, "--config.proposals.source=detector")
  result = subprocess.run([sys.executable, "scripts/propose.py", "--images", str(tmp_path / "missing"),
                           "--out-objects", str(tmp_path / "o.json")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2
  assert result.stderr.strip() == f"propose.py: error: --images {str(tmp_path / 'missing')!r} is not a folder"
