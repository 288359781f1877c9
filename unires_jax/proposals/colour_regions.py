"""The `colour_regions` source: object and part proposals from the pixels alone, for flat-coloured shapes on a
plain background (the synthetic set, diagrams, cartoons). It reads no annotation.

For each image:
1. background: the most frequent colour (after quantising every channel to multiples of `colour_quantum`);
   foreground: the pixels whose quantised colour differs from it;
2. objects: the 8-connected components of the foreground dilated by `merge_gap` px (pieces of one shape that
   are at most 2 × `merge_gap` px apart join; shapes farther apart stay apart), each cut back to its own
   foreground pixels and kept when it has at least `min_object_area` px;
3. parts: within each object, its pixels grouped by quantised colour; a colour group (which may be several pieces,
   like two arms of one colour) of at least `min_part_area` px is a part. An object of a single colour has no
   parts; otherwise every colour group is one, the body's included.
Boxes are the pixel extents `(x0, y0, x1 + 1, y1 + 1)`; objects are sorted by area (largest first) and scored by
their share of the image, parts by their share of their object. `max_objects` / `max_parts` keep the first K per
image (0: all). Options: `proposals.colour_regions` (configs/common.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from unires_jax.proposals.base import SOURCES, ImageInput, ImageProposals


@dataclasses.dataclass(frozen=True)
class ColourRegionsConfig:
  colour_quantum: int = 8
  merge_gap: int = 1
  min_object_area: int = 16
  min_part_area: int = 4
  max_objects: int = 0
  max_parts: int = 0

  def __post_init__(self):
    for name, low in (("colour_quantum", 1), ("merge_gap", 0), ("min_object_area", 1), ("min_part_area", 1),
                      ("max_objects", 0), ("max_parts", 0)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"proposals.colour_regions.{name} must be an int >= {low}, got {value!r}")


def _box(mask: np.ndarray) -> list[float]:
  ys, xs = np.nonzero(mask)
  return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _boxes(boxes: list[list[float]]) -> np.ndarray:
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def regions(pixels: np.ndarray, config: ColourRegionsConfig) -> ImageProposals:
  """Object and part boxes of one uint8 image [h, w, 3] (the module docstring gives the rule)."""
  if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
    raise ValueError(f"colour_regions: expected uint8 pixels [h, w, 3], got {pixels.dtype} {pixels.shape}")
  height, width, _ = pixels.shape
  quantised = (pixels // config.colour_quantum).astype(np.int32)  # [h, w, 3]
  colour_ids = (quantised[..., 0] * 65536 + quantised[..., 1] * 256 + quantised[..., 2])  # [h, w]
  values, counts = np.unique(colour_ids, return_counts=True)
  foreground = colour_ids != values[np.argmax(counts)]  # [h, w]
  structure = np.ones((3, 3), bool)
  merged = ndimage.binary_dilation(foreground, structure, iterations=config.merge_gap) if config.merge_gap else foreground
  labels, count = ndimage.label(merged, structure)  # [h, w]
  found = []
  for label in range(1, count + 1):
    member = (labels == label) & foreground  # [h, w]
    area = int(member.sum())
    if area < config.min_object_area:
      continue
    parts = []
    part_colours, part_counts = np.unique(colour_ids[member], return_counts=True)
    if len(part_colours) > 1:
      for colour, part_area in sorted(zip(part_colours, part_counts), key=lambda c: -c[1]):
        if part_area >= config.min_part_area:
          parts.append((_box(member & (colour_ids == colour)), part_area / area))
    found.append((area, _box(member), parts))
  found.sort(key=lambda entry: -entry[0])
  if config.max_objects:
    found = found[:config.max_objects]
  parts = sorted((part for _, _, object_parts in found for part in object_parts), key=lambda p: -p[1])
  if config.max_parts:
    parts = parts[:config.max_parts]
  return ImageProposals(object_boxes=_boxes([box for _, box, _ in found]),
                        part_boxes=_boxes([box for box, _ in parts]),
                        object_scores=np.asarray([area / (height * width) for area, _, _ in found], np.float32),
                        part_scores=np.asarray([share for _, share in parts], np.float32))


@SOURCES.register("colour_regions")
class ColourRegions:
  """Connected flat-colour regions: objects, and their single-colour pieces as parts."""
  is_ground_truth = False

  def __init__(self, config=None):
    section = {} if config is None else config.get("colour_regions", {})
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    known = {f.name for f in dataclasses.fields(ColourRegionsConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
      raise ValueError(f"proposals.colour_regions: unknown key(s) {unknown}; expected among {sorted(known)}")
    self.config = ColourRegionsConfig(**section)

  def describe(self) -> str:
    c = self.config
    return (f"colour_regions (pixels only: quantum {c.colour_quantum}, merge gap {c.merge_gap} px, "
            f"min areas {c.min_object_area}/{c.min_part_area} px)")

  def __call__(self, images: Sequence[ImageInput]) -> list[ImageProposals]:
    return [regions(np.asarray(image.pixels()), self.config) for image in images]
