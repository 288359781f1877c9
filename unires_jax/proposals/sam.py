"""The `sam` proposal source: SAM automatic mask generation in JAX; the kept masks become object and part boxes.

Per image, as segment-anything's `SamAutomaticMaskGenerator` (definitions in `amg.py`, the model in `sam_model.py`):

1. Crops: the whole image, plus `crop_n_layers` layers of 2^i × 2^i overlapping crops.
2. Each crop is resized so its longest side is S (PIL bilinear, SAM's rounding), normalised with SAM's pixel
   statistics and zero-padded to S × S, then embedded once. Its point grid (`points_per_side`, divided by
   `crop_n_points_downscale_factor` per layer) goes to the decoder in batches of `points_per_batch` single positive
   points, with multimask output: three masks and three predicted IoUs per point.
3. Masks are upsampled to the crop's pixels. Kept: predicted IoU > `pred_iou_thresh`, stability score
   >= `stability_score_thresh` (either test off at 0), a non-empty mask, and a box not within `crop_edge_atol` px of
   a crop side that is not an image side.
4. Box NMS at `box_nms_thresh` within each crop (by predicted IoU), then at `crop_nms_thresh` across crops
   preferring smaller crops (score 1 / crop area); with `min_mask_region_area` > 0, holes and islands under that
   area are removed and NMS runs again (max of both thresholds) preferring masks the clean-up left unchanged.
5. Object or part, the rule: every kept mask has its multimask level (0, 1, 2: SAM's three outputs for a point,
   which the SAM paper describes as subpart, part and whole) and its area. A mask is a **part** when its level is
   in `part_levels` (default 0 and 1) and it lies inside a clearly larger kept mask: some kept mask has at least
   `part_area_ratio` × its area and covers at least `part_containment` of its pixels. Every other mask is an
   **object**. Whole-level masks are always objects: there SAM answers "the whole thing under this point", and a
   whole nested in a larger mask is mostly a thing on a surface (a cup on a table), not a part of it.
6. Boxes are the masks' pixel extents (x0, y0, x1, y1), x1 and y1 exclusive, in original image pixels; the score
   of a box is its mask's predicted IoU. Objects and parts come best first, cut to `max_objects` / `max_parts`
   (0: all).

Filter comparisons are segment-anything's (transformers' `filter_masks` uses stability > rather than >=).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from unires_jax.pixel_stats import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from unires_jax.proposals import amg
from unires_jax.proposals.base import SOURCES, ImageInput, ImageProposals
from unires_jax.proposals.sam_model import CropGeometry, SamArchitecture, SamSegmenter, crop_geometry, load_sam

NUM_LEVELS = 3  # SAM's multimask outputs


@dataclasses.dataclass(frozen=True)
class AmgOptions:
  """The `proposals.sam` config section without `checkpoint` (documented in `configs/common.py`)."""
  points_per_side: int = 32
  points_per_batch: int = 64
  pred_iou_thresh: float = 0.88
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  mask_threshold: float = 0.0
  box_nms_thresh: float = 0.7
  crop_n_layers: int = 0
  crop_nms_thresh: float = 0.7
  crop_overlap_ratio: float = 512 / 1500
  crop_n_points_downscale_factor: int = 1
  crop_edge_atol: float = 20.0
  min_mask_region_area: int = 0
  mask_canvas_multiple: int = 64
  part_levels: tuple[int, ...] = (0, 1)
  part_containment: float = 0.9
  part_area_ratio: float = 1.5
  max_objects: int = 0
  max_parts: int = 0
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "part_levels", tuple(int(level) for level in self.part_levels))
    checks = [("points_per_side", self.points_per_side >= 1, ">= 1"),
              ("points_per_batch", self.points_per_batch >= 1, ">= 1"),
              ("crop_n_layers", self.crop_n_layers >= 0, ">= 0"),
              ("crop_n_points_downscale_factor", self.crop_n_points_downscale_factor >= 1, ">= 1"),
              ("crop_overlap_ratio", 0.0 <= self.crop_overlap_ratio < 1.0, "in [0, 1)"),
              ("stability_score_offset", self.stability_score_offset > 0, "> 0"),
              ("min_mask_region_area", self.min_mask_region_area >= 0, ">= 0"),
              ("mask_canvas_multiple", self.mask_canvas_multiple >= 8 and self.mask_canvas_multiple % 8 == 0,
               "a positive multiple of 8"),
              ("part_levels", set(self.part_levels) <= set(range(NUM_LEVELS)), f"levels in 0..{NUM_LEVELS - 1}"),
              ("part_containment", 0.0 < self.part_containment <= 1.0, "in (0, 1]"),
              ("part_area_ratio", self.part_area_ratio >= 1.0, ">= 1"),
              ("max_objects", self.max_objects >= 0, ">= 0"), ("max_parts", self.max_parts >= 0, ">= 0")]
    for key in ("box_nms_thresh", "crop_nms_thresh"):
      checks.append((key, 0.0 <= getattr(self, key) <= 1.0, "in [0, 1]"))
    for key, ok, expected in checks:
      if not ok:
        raise ValueError(f"proposals.sam.{key} must be {expected}, got {getattr(self, key)!r}")
    if int(self.points_per_side / self.crop_n_points_downscale_factor ** self.crop_n_layers) < 1:
      raise ValueError(f"proposals.sam: points_per_side {self.points_per_side} / crop_n_points_downscale_factor "
                       f"{self.crop_n_points_downscale_factor}^{self.crop_n_layers} leaves no point in the last layer")

  @classmethod
  def from_config(cls, section: ml_collections.ConfigDict | Mapping) -> "AmgOptions":
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    values.pop("checkpoint", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise KeyError(f"proposals.sam: unknown key(s) {unknown}; known: {sorted(known | {'checkpoint'})}")
    return cls(**values)


@dataclasses.dataclass
class _Crop:
  """One crop of one image, ready for the model."""
  image: int
  index: int
  box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels
  image_box: tuple[int, int, int, int]  # (0, 0, width, height) of its image
  canvas_pixels: np.ndarray  # float32 [S, S, 3]
  points: np.ndarray  # float32 [n, 2] (x, y) in [0, 1] of the S canvas
  canvas: int  # side of the square mask canvas
  geometry: CropGeometry

  @property
  def area(self) -> int:
    return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclasses.dataclass
class _Masks:
  """Candidate masks: boxes int [K, 4] (SAM's inclusive boxes, image frame), scores float32 [K], levels, crops,
  and the masks, bit-packed on their crop's canvas (`packed` [K, canvas, canvas / 8])."""
  boxes: np.ndarray
  scores: np.ndarray
  levels: np.ndarray
  crops: np.ndarray
  packed: list[np.ndarray]

  def take(self, index: np.ndarray) -> "_Masks":
    return _Masks(self.boxes[index], self.scores[index], self.levels[index], self.crops[index],
                  [self.packed[i] for i in index])

  @staticmethod
  def concatenate(parts: Sequence["_Masks"]) -> "_Masks":
    if not parts:
      return _Masks(np.zeros((0, 4), np.int64), np.zeros((0,), np.float32), np.zeros((0,), np.int64),
                    np.zeros((0,), np.int64), [])
    return _Masks(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("boxes", "scores", "levels", "crops")),
                  [m for p in parts for m in p.packed])


def sam_canvas(pixels: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, 3] → float32 [size, size, 3]: longest side to `size` (PIL bilinear), SAM-normalised, zero-padded
  at the bottom / right."""
  height, width = amg.longest_side_shape(pixels.shape[0], pixels.shape[1], size)
  resized = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR), np.float32)
  canvas = np.zeros((size, size, 3), np.float32)
  canvas[:height, :width] = (resized - np.asarray(SAM_PIXEL_MEAN, np.float32)) / np.asarray(SAM_PIXEL_STD,
                                                                                              np.float32)
  return canvas


def _pixels(image: ImageInput) -> np.ndarray:
  pixels = np.asarray(image.pixels())
  if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
    raise ValueError(f"proposals.sam: image {image.file_name!r} (id {image.image_id}) decoded to {pixels.dtype} "
                     f"{pixels.shape}, expected uint8 [h, w, 3]")
  if pixels.shape[:2] != (image.height, image.width):
    raise ValueError(f"proposals.sam: image {image.file_name!r} (id {image.image_id}) is {pixels.shape[0]}x"
                     f"{pixels.shape[1]} pixels but its record says {image.height}x{image.width}")
  return pixels


@SOURCES.register("sam")
class SamAutomaticMasks:
  """SAM automatic mask generation; the module docstring gives the pipeline and the object / part rule."""
  is_ground_truth = False

  def __init__(self, config: ml_collections.ConfigDict, segmenter: SamSegmenter | None = None,
               weights: str | None = None):
    """`config` is the whole `proposals` section; `segmenter` (with `weights` naming its weights) replaces loading
    `proposals.sam.checkpoint`."""
    section = config.sam
    self.options = AmgOptions.from_config(section)
    if segmenter is None:
      checkpoint = str(section.get("checkpoint", ""))
      if not checkpoint:
        raise ValueError("proposals.sam.checkpoint is empty: give a SamModel.save_pretrained folder or a folder "
                         "written by unires_jax.proposals.sam_model.save_converted")
      arch, params = load_sam(checkpoint)
      segmenter = self.make_segmenter(arch, params, self.options)
      weights = os.path.basename(os.path.normpath(checkpoint))
    self.segmenter = segmenter
    self.weights = weights or "unnamed weights"
    self.grids = amg.layer_point_grids(self.options.points_per_side, self.options.crop_n_layers,
                                       self.options.crop_n_points_downscale_factor)

  @staticmethod
  def make_segmenter(arch: SamArchitecture, params: Mapping, options: AmgOptions,
                     devices: Sequence[jax.Device] | None = None) -> SamSegmenter:
    return SamSegmenter(arch, params, mask_threshold=options.mask_threshold,
                        stability_offset=options.stability_score_offset, dtype=options.dtype, devices=devices)

  def describe(self) -> str:
    o = self.options
    return (f"sam (automatic masks, {self.weights}; points_per_side={o.points_per_side}, "
            f"crop_n_layers={o.crop_n_layers}, pred_iou>{o.pred_iou_thresh:g}, stability>={o.stability_score_thresh:g}, "
            f"nms={o.box_nms_thresh:g}; parts: levels {list(o.part_levels)} inside a {o.part_area_ratio:g}x larger "
            f"mask at {o.part_containment:g})")

  # --- crops and model ---------------------------------------------------------------------------------------------
  def _crops(self, image_index: int, pixels: np.ndarray) -> list[_Crop]:
    o, size = self.options, self.segmenter.arch.image_size
    height, width = pixels.shape[:2]
    boxes, layers = amg.crop_boxes(height, width, o.crop_n_layers, o.crop_overlap_ratio)
    crops = []
    for index, ((x0, y0, x1, y1), layer) in enumerate(zip(boxes.tolist(), layers.tolist())):
      crop_h, crop_w = y1 - y0, x1 - x0
      resized_h, resized_w = amg.longest_side_shape(crop_h, crop_w, size)
      in_crop = self.grids[layer] * np.asarray([crop_w, crop_h], np.float64)  # crop pixels
      resized = in_crop * np.asarray([resized_w / crop_w, resized_h / crop_h])
      canvas = -(-max(crop_h, crop_w) // o.mask_canvas_multiple) * o.mask_canvas_multiple
      crops.append(_Crop(image_index, index, (x0, y0, x1, y1), (0, 0, width, height), sam_canvas(pixels[y0:y1, x0:x1], size),
                         ((resized + 0.5) / size).astype(np.float32), canvas,
                         crop_geometry(crop_h, crop_w, size, self.segmenter.arch.low_res_size, canvas)))
    return crops

  def _embed(self, crops: Sequence[_Crop]) -> list[np.ndarray]:
    shards, out = self.segmenter.num_shards, []
    for start in range(0, len(crops), shards):
      chunk = [crop.canvas_pixels for crop in crops[start:start + shards]]
      chunk += [np.zeros_like(chunk[0])] * (shards - len(chunk))
      embeddings = jax.device_get(self.segmenter.embed(self.segmenter.params, self.segmenter.shard(np.stack(chunk))))
      out.extend(embeddings[:min(shards, len(crops) - start)])
    return out

  def _decode(self, crops: Sequence[_Crop], embeddings: Sequence[np.ndarray]) -> dict[tuple[int, int], _Masks]:
    """Every crop's kept candidates after the per-batch filters and the per-crop NMS, keyed (image, crop)."""
    batch, shards = self.options.points_per_batch, self.segmenter.num_shards
    items = collections.defaultdict(list)  # canvas → [(crop position, first point)]
    for position, crop in enumerate(crops):
      for first in range(0, len(crop.points), batch):
        items[crop.canvas].append((position, first))
    found = collections.defaultdict(dict)  # crop position → {first point: _Masks}
    for group in items.values():
      for start in range(0, len(group), shards):
        chunk = group[start:start + shards]
        padded = chunk + [chunk[-1]] * (shards - len(chunk))
        points = np.stack([_pad_points(crops[p].points[first:first + batch], batch) for p, first in padded])
        stacked = {name: self.segmenter.shard(np.stack([getattr(crops[p].geometry, name) for p, _ in padded]))
                   for name in ("rows", "cols", "valid_rows", "valid_cols")}
        out = jax.device_get(self.segmenter.decode(
            self.segmenter.params, self.segmenter.shard(np.stack([embeddings[p] for p, _ in padded])),
            self.segmenter.shard(points), stacked["rows"], stacked["cols"],
            (stacked["valid_rows"], stacked["valid_cols"])))
        for item, (position, first) in enumerate(chunk):
          count = min(batch, len(crops[position].points) - first)
          found[position][first] = self._filter({k: v[item, :count] for k, v in out.items()}, crops[position])
    kept = {}
    for position, crop in enumerate(crops):
      masks = _Masks.concatenate([found[position][first] for first in sorted(found[position])])
      kept[(crop.image, crop.index)] = masks.take(amg.nms(masks.boxes, masks.scores, self.options.box_nms_thresh))
    return kept

  def _filter(self, out: Mapping[str, np.ndarray], crop: _Crop) -> _Masks:
    """One batch's masks (point-major, then level) through the IoU, stability, empty and crop-edge filters."""
    o = self.options
    scores, stability = out["iou"].reshape(-1), out["stability"].reshape(-1)
    keep = out["area"].reshape(-1) > 0
    if o.pred_iou_thresh > 0:
      keep &= scores > o.pred_iou_thresh
    if o.stability_score_thresh > 0:
      keep &= stability >= o.stability_score_thresh
    x0, y0 = crop.box[:2]
    boxes = out["boxes"].reshape(-1, 4).astype(np.int64) + np.asarray([x0, y0, x0, y0])
    keep &= ~amg.near_crop_edge(boxes, crop.box, crop.image_box, o.crop_edge_atol)
    index = np.flatnonzero(keep)
    packed = out["packed"].reshape(-1, *out["packed"].shape[-2:])
    return _Masks(boxes[index], scores[index].astype(np.float32), index % NUM_LEVELS,
                  np.full(len(index), crop.index, np.int64), [packed[i].copy() for i in index])

  # --- per image -----------------------------------------------------------------------------------------------
  def _image_proposals(self, masks: _Masks, crops: Sequence[_Crop], height: int, width: int) -> ImageProposals:
    o = self.options
    if len(crops) > 1:
      crop_area = np.asarray([crops[c].area for c in masks.crops], np.float32)
      masks = masks.take(amg.nms(masks.boxes, np.float32(1.0) / crop_area, o.crop_nms_thresh))
    full = np.stack([_unpack(packed, crops[c], height, width) for packed, c in zip(masks.packed, masks.crops)]) \
        if masks.packed else np.zeros((0, height, width), bool)
    if o.min_mask_region_area > 0 and len(full):
      masks, full = clean_small_regions(masks, full, o.min_mask_region_area, max(o.box_nms_thresh, o.crop_nms_thresh))
    parts = amg.part_flags(full, masks.levels, o.part_levels, o.part_containment, o.part_area_ratio)
    extents = masks.boxes.astype(np.float32) + np.asarray([0, 0, 1, 1], np.float32)  # inclusive → pixel extents
    object_boxes, object_scores = _best_first(extents[~parts], masks.scores[~parts], o.max_objects)
    part_boxes, part_scores = _best_first(extents[parts], masks.scores[parts], o.max_parts)
    return ImageProposals(object_boxes, part_boxes, object_scores, part_scores)

  def __call__(self, images: Sequence[ImageInput]) -> list[ImageProposals]:
    images = list(images)
    sizes, crops = [], []
    for index, image in enumerate(images):
      pixels = _pixels(image)
      sizes.append(pixels.shape[:2])
      crops.extend(self._crops(index, pixels))
    if not crops:
      return []
    kept = self._decode(crops, self._embed(crops))
    out = []
    for index, (height, width) in enumerate(sizes):
      image_crops = [crop for crop in crops if crop.image == index]
      masks = _Masks.concatenate([kept[(index, crop.index)] for crop in image_crops])
      out.append(self._image_proposals(masks, image_crops, height, width))
    return out


def clean_small_regions(masks: _Masks, full: np.ndarray, min_area: int, nms_thresh: float
                        ) -> tuple[_Masks, np.ndarray]:
  """SAM's `postprocess_small_regions`: holes, then islands, under `min_area` px removed from each image-frame mask
  (`full` bool [K, H, W]); boxes recomputed; NMS at `nms_thresh` preferring masks the clean-up left unchanged."""
  cleaned, unchanged = [], []
  for mask in full:
    mask, filled = amg.remove_small_regions(mask, min_area, "holes")
    mask, dropped = amg.remove_small_regions(mask, min_area, "islands")
    cleaned.append(mask)
    unchanged.append(not (filled or dropped))
  cleaned = np.stack(cleaned)
  boxes = amg.mask_boxes(cleaned).astype(np.int64)
  keep = amg.nms(boxes, np.asarray(unchanged, np.float32), nms_thresh)
  result = masks.take(keep)
  result.boxes = boxes[keep]
  return result, cleaned[keep]


def _pad_points(points: np.ndarray, count: int) -> np.ndarray:
  """[n, 2] → [count, 2], repeating the last point (its results are dropped)."""
  return np.concatenate([points, np.repeat(points[-1:], count - len(points), axis=0)])


def _unpack(packed: np.ndarray, crop: _Crop, height: int, width: int) -> np.ndarray:
  """A crop-canvas bit-packed mask → bool [height, width] in the image frame."""
  x0, y0, x1, y1 = crop.box
  mask = np.zeros((height, width), bool)
  mask[y0:y1, x0:x1] = np.unpackbits(packed, axis=-1, count=crop.canvas)[:y1 - y0, :x1 - x0].astype(bool)
  return mask


def _best_first(boxes: np.ndarray, scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
  order = np.argsort(-scores, kind="stable")
  if limit:
    order = order[:limit]
  return boxes[order].reshape(-1, 4).astype(np.float32), scores[order].astype(np.float32)
