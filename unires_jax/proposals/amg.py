"""SAM automatic mask generation around the model: crop boxes, point grids, mask statistics, the crop-edge filter,
box NMS, small-region clean-up and the object / part rule.

Definitions follow segment-anything's `SamAutomaticMaskGenerator` (transformers' `SamImageProcessor` holds a copy):

- Crop boxes: layer 0 is the whole image; layer i has 2^i × 2^i crops overlapping by
  `int(overlap_ratio · short_side · 2 / 2^i)` pixels. Boxes are (x0, y0, x1, y1) with x1, y1 exclusive.
- Point grid: n × n points at `linspace(1/(2n), 1 - 1/(2n), n)`, x fastest; layer i uses
  `int(points_per_side / downscale^i)` per side.
- Stability score: |logits > t + offset| / |logits > t - offset|, counted at the crop's own resolution.
- Mask boxes are SAM's: (x0, y0, x1, y1) of the first and last set column / row, *inclusive*; an empty mask gives
  (0, 0, 0, 0). NMS and the crop-edge filter see these boxes, as in SAM; sources report pixel extents (x1 + 1).
- NMS is torchvision's `nms`: boxes by descending score (ties kept in input order; torchvision leaves their order
  unspecified), a box is dropped when its IoU with a kept one is > the threshold, areas (x1 - x0)(y1 - y0) in
  float32.

`mask_boxes` and `stability_score` take an array module (`numpy` or `jax.numpy`), so the same definition runs on the
device next to the decoder and on the host.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage


# --- crops and points --------------------------------------------------------------------------------------------
def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> tuple[np.ndarray, np.ndarray]:
  """(boxes int64 [N, 4] as (x0, y0, x1, y1), layer of each box int64 [N]); box 0 is the whole image."""
  boxes, layers = [[0, 0, width, height]], [0]
  short_side = min(height, width)
  for layer in range(1, n_layers + 1):
    per_side = 2 ** layer
    overlap = int(overlap_ratio * short_side * (2 / per_side))
    crop_w = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
    crop_h = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
    lefts = [int((crop_w - overlap) * i) for i in range(per_side)]
    tops = [int((crop_h - overlap) * i) for i in range(per_side)]
    for left, top in itertools.product(lefts, tops):  # x-major, as SAM orders them
      boxes.append([left, top, min(left + crop_w, width), min(top + crop_h, height)])
      layers.append(layer)
  return np.asarray(boxes, np.int64), np.asarray(layers, np.int64)


def point_grid(points_per_side: int) -> np.ndarray:
  """[n², 2] float64 (x, y) in [0, 1], cell centres of an n × n grid, x fastest."""
  offset = 1.0 / (2 * points_per_side)
  side = np.linspace(offset, 1 - offset, points_per_side)
  ys, xs = np.meshgrid(side, side, indexing="ij")
  return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


def layer_point_grids(points_per_side: int, n_layers: int, downscale_factor: int) -> list[np.ndarray]:
  """The point grid of each crop layer 0..n_layers."""
  return [point_grid(int(points_per_side / downscale_factor ** layer)) for layer in range(n_layers + 1)]


def longest_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) scaled so the longest side is `size`, rounded half up as SAM's `ResizeLongestSide` does."""
  scale = size * 1.0 / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


# --- mask statistics (numpy or jax.numpy) ------------------------------------------------------------------------
def stability_score(logits, valid, mask_threshold: float, offset: float, xp: Any = np):
  """logits [..., H, W] (only `valid` pixels [..., H, W] count) → |logits > t + o| / |logits > t - o| float32.

  NaN where no valid pixel exceeds t - o.
  """
  high = xp.sum((logits > mask_threshold + offset) & valid, axis=(-2, -1), dtype=xp.int32)
  low = xp.sum((logits > mask_threshold - offset) & valid, axis=(-2, -1), dtype=xp.int32)
  return high.astype(xp.float32) / low.astype(xp.float32)


def mask_boxes(masks, xp: Any = np):
  """bool [..., H, W] → int32 [..., 4] (x0, y0, x1, y1) of the set pixels, inclusive; (0, 0, 0, 0) if empty."""
  height, width = masks.shape[-2:]
  rows = xp.any(masks, axis=-1)  # [..., H]
  cols = xp.any(masks, axis=-2)  # [..., W]
  top = xp.argmax(rows, axis=-1)
  bottom = height - 1 - xp.argmax(rows[..., ::-1], axis=-1)
  left = xp.argmax(cols, axis=-1)
  right = width - 1 - xp.argmax(cols[..., ::-1], axis=-1)
  boxes = xp.stack([left, top, right, bottom], axis=-1).astype(xp.int32)
  return xp.where(xp.any(rows, axis=-1)[..., None], boxes, 0)


# --- filters and NMS ---------------------------------------------------------------------------------------------
def near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], image_box: Sequence[int], atol: float) -> np.ndarray:
  """bool [N]: a box side (image frame) lies within `atol` px of its crop's side where that side is not also the
  image's; SAM drops such masks, likely cut by the crop."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  near_crop = np.abs(boxes - np.asarray(crop_box, np.float32)) <= atol
  near_image = np.abs(boxes - np.asarray(image_box, np.float32)) <= atol
  return np.any(near_crop & ~near_image, axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Indices of the boxes [N, 4] (x0, y0, x1, y1) kept by non-maximum suppression, best score first."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  if len(boxes) != len(scores):
    raise ValueError(f"nms: {len(boxes)} boxes but {len(scores)} scores")
  x0, y0, x1, y1 = boxes.T
  areas = (x1 - x0) * (y1 - y0)
  order = np.argsort(-scores, kind="stable")
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 for degenerate boxes: NaN, never > threshold
    for position, best in enumerate(order):
      if suppressed[best]:
        continue
      keep.append(best)
      rest = order[position + 1:]
      rest = rest[~suppressed[rest]]
      inter_w = np.maximum(np.float32(0), np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]))
      inter_h = np.maximum(np.float32(0), np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]))
      inter = inter_w * inter_h
      iou = inter / (areas[best] + areas[rest] - inter)
      suppressed[rest[iou.astype(np.float64) > iou_threshold]] = True
  return np.asarray(keep, np.int64)


def remove_small_regions(mask: np.ndarray, min_area: int, mode: str) -> tuple[np.ndarray, bool]:
  """SAM's clean-up of one bool mask [H, W]: `holes` fills background regions under `min_area` px, `islands` drops
  foreground regions under it (keeping the largest if all are small); 8-connected. Returns (mask, changed)."""
  if mode not in ("holes", "islands"):
    raise ValueError(f"remove_small_regions: mode must be 'holes' or 'islands', got {mode!r}")
  fill_holes = mode == "holes"
  regions, count = ndimage.label(mask != fill_holes, structure=np.ones((3, 3), bool))  # 0: the other pixels
  sizes = np.bincount(regions.reshape(-1), minlength=count + 1)[1:]
  small = [label + 1 for label, size in enumerate(sizes) if size < min_area]
  if not small:
    return mask, False
  if fill_holes:
    keep_labels = [0] + small
  else:
    keep_labels = [label for label in range(1, count + 1) if label not in small] or [int(np.argmax(sizes)) + 1]
  return np.isin(regions, keep_labels), True


# --- object or part ------------------------------------------------------------------------------------------------
def part_flags(masks: np.ndarray, levels: np.ndarray, part_levels: Sequence[int], containment: float,
               area_ratio: float) -> np.ndarray:
  """bool [N]: which kept masks [N, H, W] are parts (the rule in `unires_jax/proposals/sam.py`).

  Mask i is a part when its multimask level is in `part_levels` and some other kept mask j has
  area_j >= area_ratio · area_i and |i ∩ j| >= containment · area_i.
  """
  masks = np.asarray(masks, bool)
  areas = masks.sum(axis=(1, 2))
  boxes = mask_boxes(masks)
  flags = np.zeros(len(masks), bool)
  for i in range(len(masks)):
    if levels[i] not in part_levels or areas[i] == 0:
      continue
    larger = np.flatnonzero(areas >= area_ratio * areas[i])
    larger = larger[larger != i]
    if not len(larger):
      continue
    x0, y0, x1, y1 = boxes[i]
    window = masks[i, y0:y1 + 1, x0:x1 + 1]  # mask i lies inside its box, so the intersection does too
    inside = (masks[larger, y0:y1 + 1, x0:x1 + 1] & window).reshape(len(larger), -1).sum(axis=1)
    flags[i] = bool(np.any(inside >= containment * areas[i]))
  return flags
