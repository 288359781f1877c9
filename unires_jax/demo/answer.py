"""A model output as the page shows it: the granularity the answer implies, the overlay, the mask PNG.

The run's answer templates ("Sure, it is [SEG].") do not name a granularity, so it is read from the answer and
its mask: no `[SEG]` is no-target; a mask of several separate regions is multi-object; one region is a part when
the proposal box it matches best (box IoU ≥ 0.5) is a part proposal, else an object. Two disjoint regions of
one part (a robot's two arms) therefore read as multi-object: the page says where the reading came from.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from unires_jax.data import pipeline
from unires_jax.eval import inference
from unires_jax.proposals import ImageProposals

NO_TARGET = "no such target"
MIN_REGION_FRACTION = 0.05  # regions smaller than this share of the largest one are specks, not objects
BOX_MATCH_IOU = 0.5
PROPOSAL_COLOURS = {"object": (0, 200, 255), "part": (255, 200, 0)}
MASK_COLOUR = (255, 0, 0)
DISPLAY_MIN_SIDE = 384  # pixels of the longer side below which the page enlarges an overlay


def mask_regions(mask: np.ndarray) -> list[np.ndarray]:
  """The mask's 8-connected regions, largest first, without specks (< MIN_REGION_FRACTION of the largest)."""
  labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))  # [h, w]
  if not count:
    return []
  areas = np.bincount(labels.ravel())[1:]  # [count]
  order = np.argsort(-areas, kind="stable")
  keep = [k for k in order if areas[k] >= MIN_REGION_FRACTION * areas[order[0]]]
  return [labels == k + 1 for k in keep]


def _mask_box(mask: np.ndarray) -> np.ndarray:
  """[1, 4] (x0, y0, x1, y1) of the mask's pixels, in the convention of the records' boxes (x1 exclusive)."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], np.float32)


def implied_granularity(has_seg: bool, mask: np.ndarray, proposals: ImageProposals) -> str:
  """'no-target', 'multi-object (N regions)', 'part' or 'object', with what it was read from."""
  if not has_seg:
    return "no-target (the answer has no [SEG])"
  regions = mask_regions(mask)
  if not regions:
    return "no-target (the answer has [SEG] but its mask is empty)"
  if len(regions) > 1:
    return f"multi-object (the mask has {len(regions)} separate regions)"
  box = _mask_box(regions[0])
  best = {}
  for kind, boxes in (("object", proposals.object_boxes), ("part", proposals.part_boxes)):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    best[kind] = float(pipeline.box_iou(box, boxes).max()) if len(boxes) else 0.0
  kind = max(best, key=best.get)
  if best[kind] >= BOX_MATCH_IOU:
    return f"{kind} (one region, matching a {kind} proposal at box IoU {best[kind]:.2f})"
  return "object (one region; no proposal box matches it)"


def overlay_image(pixels: np.ndarray, mask: np.ndarray, proposals: ImageProposals | None = None) -> np.ndarray:
  """uint8 [h, w, 3]: the mask tinted red (as `scripts/predict.py`'s overlay); proposal boxes outlined when given
  (objects cyan, parts amber)."""
  tinted = inference.overlay(pixels, mask, colour=MASK_COLOUR)
  if proposals is None:
    return tinted
  image = Image.fromarray(tinted)
  draw = ImageDraw.Draw(image)
  line = max(1, round(max(image.size) / 300))
  for kind, boxes in (("object", proposals.object_boxes), ("part", proposals.part_boxes)):
    for x0, y0, x1, y1 in np.asarray(boxes, np.float32).reshape(-1, 4):
      draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=PROPOSAL_COLOURS[kind], width=line)
  return np.asarray(image)


def enlarge_for_display(pixels: np.ndarray, min_side: int = DISPLAY_MIN_SIDE) -> np.ndarray:
  """Small images (the synthetic set's 96×128) repeated by a whole factor so the page shows them readably."""
  zoom = max(1, min_side // max(pixels.shape[:2]))
  return np.repeat(np.repeat(pixels, zoom, axis=0), zoom, axis=1) if zoom > 1 else pixels


def save_mask_png(mask: np.ndarray, path: str) -> str:
  """The mask as `scripts/predict.py` writes it: 255 on the referred region, 0 elsewhere."""
  Image.fromarray(np.asarray(mask, np.uint8) * 255).save(path)
  return path
