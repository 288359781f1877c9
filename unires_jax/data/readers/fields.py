"""Reading one entry's fields: JSON files, keys, images, boxes, masks as RLE, sentences, EXIF turns.

Each helper raises `MalformedEntryError` naming the file and entry (`where`) and what was expected.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from unires_jax.data import images, records
from unires_jax.data.readers.errors import MalformedEntryError


def _load_json(path: str) -> Any:
  if not os.path.exists(path):
    raise FileNotFoundError(f"annotation file {path} missing")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise MalformedEntryError("bad_json", f"annotation file {path}: not valid JSON ({error})") from error


def _get(entry: Any, key: str, where: str) -> Any:
  if not isinstance(entry, dict):
    raise MalformedEntryError("bad_entry", f"{where}: expected a dict, got {type(entry).__name__}")
  if key not in entry:
    raise MalformedEntryError("missing_key", f"{where}: {key!r} missing")
  return entry[key]


def _read_image(image_dir: str, file_name: str, where: str) -> tuple[bytes, int, int]:
  """(file bytes, stored height, stored width); every pixel is decoded so a truncated file fails here."""
  path = os.path.join(image_dir, file_name)
  if not os.path.exists(path):
    raise MalformedEntryError("missing_image", f"{where}: image {path} missing")
  with open(path, "rb") as f:
    data = f.read()
  try:
    height, width, orientation = images.image_info(data, where=f"{where}: image {path}")
  except images.ImageError as error:
    raise MalformedEntryError("bad_image", str(error)) from error
  if orientation in (5, 6, 7, 8):
    height, width = width, height  # annotations are on the stored pixels (_upright turns them)
  return data, height, width


def _upright(record: dict) -> dict:
  """A record whose image carries an EXIF orientation, with masks, boxes and size turned to the upright image
  the pipeline decodes. Annotations are taken to be on the stored pixels, as COCO's are (data/README.md)."""
  orientation = images.read_orientation(record["image_bytes"])
  if orientation == 1:
    return record
  height, width = record["height"], record["width"]
  annotations = []
  for ann in record["annotations"]:
    mask = mask_utils.decode(dict(ann["rle"], counts=ann["rle"]["counts"].encode("ascii")))  # [h, w] uint8
    turned = np.asfortranarray(images.orient_mask(mask, orientation))
    box = images.orient_boxes(np.asarray([ann["bbox"]]), orientation, height, width)[0]
    annotations.append(dict(ann, bbox=[float(v) for v in box], rle=_rle_to_record(mask_utils.encode(turned))))
  upright_hw = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
  proposals = dict(record["proposals"])
  for kind in records.PROPOSAL_KINDS:
    proposals[kind] = [[float(v) for v in box] for box in images.orient_boxes(
        np.asarray(proposals[kind], np.float64).reshape(-1, 4), orientation, height, width)]
  return dict(record, height=upright_hw[0], width=upright_hw[1], annotations=annotations, proposals=proposals)


def _box(values: Any, where: str, layout: str) -> list[float]:
  """Four finite numbers as (x0, y0, x1, y1) from `layout` 'xywh' (w, h >= 0) or 'xyxy' (x1 >= x0, y1 >= y0)."""
  expected = "[x, y, w, h]" if layout == "xywh" else "[x0, y0, x1, y1]"
  if not isinstance(values, (list, tuple)) or len(values) != 4:
    raise MalformedEntryError("bad_bbox", f"{where}: bbox must be {expected}, got {values!r}")
  try:
    numbers = [float(v) for v in values if not isinstance(v, (bool, str))]
  except (TypeError, ValueError):
    numbers = []
  if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
    raise MalformedEntryError("bad_bbox", f"{where}: bbox must be {expected} of finite numbers, got {values!r}")
  if layout == "xywh":
    x, y, w, h = numbers
    if w < 0 or h < 0:
      raise MalformedEntryError("bad_bbox", f"{where}: bbox {values!r} has a negative width or height")
    return [x, y, x + w, y + h]
  x0, y0, x1, y1 = numbers
  if x1 < x0 or y1 < y0:
    raise MalformedEntryError("bad_bbox", f"{where}: bbox {values!r} has x1 < x0 or y1 < y0")
  return numbers


# A box may overhang the image by this many pixels (rounding in the source annotations) and is then clipped.
BOX_TOLERANCE_PX = 1.0


def _fit_box(box: list[float], height: int, width: int, where: str) -> list[float]:
  """The box clipped to the image; a box further outside than BOX_TOLERANCE_PX is refused."""
  x0, y0, x1, y1 = box
  t = BOX_TOLERANCE_PX
  if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
    raise MalformedEntryError("bad_bbox", f"{where}: bbox {box} lies outside the {width}x{height} image")
  return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


def _rle_to_record(rle: dict) -> dict:
  counts = rle["counts"]
  return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
          else counts}


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str) -> dict:
  """COCO polygons, uncompressed RLE or compressed RLE → compressed RLE {size, counts: str}."""
  if isinstance(segmentation, list):
    if not segmentation or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segmentation):
      raise MalformedEntryError("empty_polygon", f"{where}: segmentation needs polygons of >= 3 points, got "
                                f"{str(segmentation)[:60]}")
    return _rle_to_record(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
  if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    if [int(v) for v in segmentation["size"]] != [height, width]:
      raise MalformedEntryError("bad_mask", f"{where}: RLE size {segmentation['size']} is not the image size "
                                f"{[height, width]}")
    if isinstance(segmentation["counts"], list):
      return _rle_to_record(mask_utils.frPyObjects(segmentation, height, width))
    return _rle_to_record(segmentation)
  raise MalformedEntryError("bad_segmentation", f"{where}: segmentation must be polygons or RLE, got "
                            f"{type(segmentation).__name__}")


def _xywh_to_xyxy(bbox: Any, where: str) -> list[float]:
  return _box(bbox, where, "xywh")


def _sentences(ref: dict, where: str) -> list[dict]:
  sentences = _get(ref, "sentences", where)
  if not isinstance(sentences, list) or not sentences:
    raise MalformedEntryError("missing_key", f"{where}: 'sentences' must be a non-empty list")
  out = []
  for j, sentence in enumerate(sentences):
    at = f"{where} sentences[{j}]"
    out.append({"sent_id": int(_get(sentence, "sent_id", at)), "sent": str(_get(sentence, "sent", at))})
  return out
