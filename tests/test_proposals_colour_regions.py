"""The `colour_regions` source: hand-drawn shapes give exact boxes; on synthetic scenes every annotated object and
part has a proposal that overlaps it, although the source never sees an annotation."""

import random

import ml_collections
import numpy as np
import pytest

from unires_jax import proposals
from unires_jax.data import synthetic
from unires_jax.proposals import colour_regions


def _iou(a, b) -> float:
  x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
  inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_hand_drawn_shapes_give_exact_object_and_part_boxes():
  pixels = np.full((20, 30, 3), 200, np.uint8)
  pixels[2:10, 3:9] = (220, 40, 40)      # object 1, body: 8 x 6
  pixels[10:12, 3:9] = (40, 40, 40)      # object 1, a second colour touching the body
  pixels[13:15, 3:5] = (40, 40, 40)      # object 1, one pixel row below: joins through merge_gap=1
  pixels[5:8, 20:24] = (50, 80, 220)     # object 2: one colour, so no parts
  found = colour_regions.regions(pixels, colour_regions.ColourRegionsConfig(min_object_area=4, min_part_area=2))
  np.testing.assert_array_equal(found.object_boxes, [[3, 2, 9, 15], [20, 5, 24, 8]])
  np.testing.assert_allclose(found.object_scores, [(48 + 12 + 4) / 600, 12 / 600])
  # Parts of object 1 by colour: the red body, and the dark pieces together (two components, one colour).
  np.testing.assert_array_equal(found.part_boxes, [[3, 2, 9, 10], [3, 10, 9, 15]])
  np.testing.assert_allclose(found.part_scores, [48 / 64, 16 / 64])


def test_shapes_farther_apart_than_the_merge_gap_stay_apart():
  pixels = np.full((10, 20, 3), 0, np.uint8)
  pixels[2:6, 2:6] = 255
  pixels[2:6, 9:13] = 255  # three background columns between them
  config = colour_regions.ColourRegionsConfig(min_object_area=4)
  assert len(colour_regions.regions(pixels, config).object_boxes) == 2
  merged = colour_regions.regions(pixels, colour_regions.ColourRegionsConfig(min_object_area=4, merge_gap=2))
  np.testing.assert_array_equal(merged.object_boxes, [[2, 2, 13, 6]])


def test_synthetic_scenes_objects_and_parts_are_found_without_annotations():
  source = proposals.build_source(ml_collections.ConfigDict({"source": "colour_regions"}))
  assert not source.is_ground_truth and "colour_regions" in source.describe()
  rng = random.Random(3)
  height, width = 96, 128
  object_ious, part_ious = [], []
  for _ in range(12):
    scene = synthetic.make_scene(rng, height, width)
    pixels = np.asarray(synthetic._draw(scene, height, width))
    image = proposals.ImageInput(image_id=1, file_name="x.png", height=height, width=width, pixels=lambda: pixels)
    found, = source([image])
    for obj in scene:
      polygons = [p for _, polys, _ in obj["components"] for p in polys]
      x, y, w, h = synthetic._bbox_xywh(polygons)
      object_ious.append(max(_iou((x, y, x + w, y + h), box) for box in found.object_boxes))
      for part, polys, _ in obj["components"]:
        if part is not None:
          x, y, w, h = synthetic._bbox_xywh(polys)
          part_ious.append(max(_iou((x, y, x + w, y + h), box) for box in found.part_boxes))
  assert min(object_ious) > 0.85, object_ious
  assert min(part_ious) > 0.5 and np.mean(part_ious) > 0.75, part_ious


def test_bad_options_and_pixels_are_refused_by_name():
  with pytest.raises(ValueError, match="colour_regions: unknown key"):
    proposals.build_source(ml_collections.ConfigDict({"source": "colour_regions",
                                                      "colour_regions": {"quantum": 4}}))
  with pytest.raises(ValueError, match="merge_gap must be an int >= 0"):
    colour_regions.ColourRegionsConfig(merge_gap=-1)
  with pytest.raises(ValueError, match=r"expected uint8 pixels \[h, w, 3\]"):
    colour_regions.regions(np.zeros((4, 4), np.uint8), colour_regions.ColourRegionsConfig())
