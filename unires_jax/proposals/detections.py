"""The `detections` source: object and part proposals read from COCO detection-results files.

A file is what every detector writes (pycocotools `COCO.loadRes`): a JSON list of
`{image_id, bbox: [x, y, w, h] in pixels, score, category_id?}`. One file holds objects, one holds parts
(`proposals.detections.object_file` / `part_file`; an empty path means no boxes of that kind); `{split}` in a path
becomes the image's split. Matching (`match_by`):
- `image_id`: the entry's `image_id` (an int) equals the record's `image_id`.
- `file_name` (a folder of images): `str(image_id)` reduced to its base name (after the last `/`) equals the image
  file's base name (`0001.jpg`) or its stem (`0001`). A name that matches two different images is refused.
Per image and kind: entries with `score < score_threshold` are dropped, boxes are clipped to the image (boxes left
with no area are dropped), the rest sorted by score (best first, ties in file order) and cut to `top_k` (0 = all).
An image without entries has no proposals. Malformed files are refused naming the file and entry (and the JSON line
for syntax errors). `summary()` counts what happened, including the ids that matched no image, by name.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from unires_jax.proposals.base import SOURCES, ImageInput, ImageProposals

KINDS = ("object", "part")
MATCH_BY = ("image_id", "file_name")
COUNTERS = ("images", "images_with_boxes", "matched", "below_threshold", "clipped", "empty", "beyond_top_k", "kept")
UNMATCHED_SHOWN = 20  # unmatched ids named in a summary


class DetectionFileError(ValueError):
  """A detection-results file that cannot be read or does not follow the format."""


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def match_key(value: Any, match_by: str) -> int | str:
  """The key a detection's `image_id` is indexed under; raises ValueError when it cannot be one."""
  if match_by == "image_id":
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"'image_id' must be an int with match_by='image_id' (file names need "
                       f"match_by='file_name'), got {value!r}")
    return value
  if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
    raise ValueError(f"'image_id' must be a file name or an int with match_by='file_name', got {value!r}")
  return str(value).rsplit("/", 1)[-1]


def image_keys(image: ImageInput, match_by: str) -> list[int | str]:
  """The keys under which an image's detections are found (the inverse of `match_key`)."""
  if match_by == "image_id":
    return [int(image.image_id)]
  base = os.path.basename(image.file_name)
  stem = os.path.splitext(base)[0]
  return [base] if stem in ("", base) else [base, stem]


def _entry_box(entry: Any, index: int, path: str, match_by: str) -> tuple[int | str, list[float], float]:
  where = f"detections file {path} entry {index}"
  if not isinstance(entry, dict):
    raise DetectionFileError(f"{where}: expected an object {{image_id, bbox, score}}, got {type(entry).__name__}")
  for key in ("image_id", "bbox", "score"):
    if key not in entry:
      raise DetectionFileError(f"{where}: key {key!r} missing")
  try:
    key = match_key(entry["image_id"], match_by)
  except ValueError as error:
    raise DetectionFileError(f"{where}: {error}") from None
  bbox, score = entry["bbox"], entry["score"]
  if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
    raise DetectionFileError(f"{where}: 'bbox' must be [x, y, w, h] (4 numbers), got {bbox!r}")
  if not all(math.isfinite(v) for v in bbox):
    raise DetectionFileError(f"{where}: 'bbox' must be finite, got {bbox!r}")
  if bbox[2] < 0 or bbox[3] < 0:
    raise DetectionFileError(f"{where}: 'bbox' has a negative width or height, got {bbox!r}")
  if not _is_number(score) or not math.isfinite(score):
    raise DetectionFileError(f"{where}: 'score' must be a finite number, got {score!r}")
  category = entry.get("category_id")
  if category is not None and (not isinstance(category, int) or isinstance(category, bool)):
    raise DetectionFileError(f"{where}: 'category_id' must be an int when present, got {category!r}")
  x, y, w, h = (float(v) for v in bbox)
  return key, [x, y, x + w, y + h], float(score)


class DetectionFile:
  """One parsed results file: boxes (x0, y0, x1, y1) float64 [N, 4] and scores [N] in file order, indexed by key."""

  def __init__(self, path: str, match_by: str):
    self.path = path
    if not os.path.isfile(path):
      raise DetectionFileError(f"detections file {path} does not exist")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    try:
      entries = json.loads(text)
    except json.JSONDecodeError as error:
      raise DetectionFileError(f"detections file {path} line {error.lineno} column {error.colno}: invalid JSON "
                               f"({error.msg})") from None
    if not isinstance(entries, list):
      raise DetectionFileError(f"detections file {path}: expected a JSON list of detections, got "
                               f"{type(entries).__name__}")
    self.by_key: dict[int | str, list[int]] = collections.defaultdict(list)
    boxes, scores = [], []
    for index, entry in enumerate(entries):
      key, box, score = _entry_box(entry, index, path, match_by)
      self.by_key[key].append(index)
      boxes.append(box)
      scores.append(score)
    self.boxes = np.asarray(boxes, np.float64).reshape(-1, 4)  # [N, 4]
    self.scores = np.asarray(scores, np.float64)  # [N]
    self.match_by = match_by
    self.matched: dict[int | str, str] = {}  # key → the file name of the image it matched

  def lookup(self, image: ImageInput) -> np.ndarray:
    """Entry indices [n] of the image's detections, in file order; marks their keys as matched."""
    found = []
    for key in image_keys(image, self.match_by):
      if key not in self.by_key:
        continue
      previous = self.matched.setdefault(key, image.file_name)
      if self.match_by == "file_name" and previous != image.file_name:
        raise DetectionFileError(f"detections file {self.path}: image_id {key!r} matches two images, "
                                 f"{previous!r} and {image.file_name!r}; name the detections by full file name")
      found += self.by_key[key]
    return np.asarray(sorted(set(found)), np.int64)

  def unmatched(self, matched: Sequence[int | str]) -> list[int | str]:
    """The keys of this file that no image matched, sorted."""
    return sorted(set(self.by_key) - set(matched))


@SOURCES.register("detections")
class DetectionFiles:
  """Proposals from COCO detection-results files (module docstring); config `proposals.detections`."""
  is_ground_truth = False

  def __init__(self, config):
    options = config.detections
    self.files = {"object": str(options.object_file), "part": str(options.part_file)}
    self.score_threshold = options.score_threshold
    self.top_k = options.top_k
    self.match_by = str(options.match_by)
    if self.match_by not in MATCH_BY:
      raise ValueError(f"proposals.detections.match_by {self.match_by!r}: expected one of {MATCH_BY}")
    if not _is_number(self.score_threshold) or not math.isfinite(self.score_threshold):
      raise ValueError(f"proposals.detections.score_threshold must be a finite number, got {self.score_threshold!r}")
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f"proposals.detections.top_k must be an int >= 0 (0 = all), got {self.top_k!r}")
    if not any(self.files.values()):
      raise ValueError("proposals.detections: object_file and part_file are both empty; give at least one")
    self._loaded: dict[str, dict[str, DetectionFile]] = {kind: {} for kind in KINDS}  # kind → path → file
    self._counts = {kind: collections.Counter({name: 0 for name in COUNTERS}) for kind in KINDS}

  def describe(self) -> str:
    files = ", ".join(f"{kind}s {path or 'none'}" for kind, path in self.files.items())
    top_k = f"top {self.top_k}" if self.top_k else "all"
    return (f"detections ({files}; score >= {self.score_threshold:g}, {top_k} per image, "
            f"match by {self.match_by})")

  def _file(self, kind: str, image: ImageInput) -> DetectionFile | None:
    template = self.files[kind]
    if not template:
      return None
    if "{split}" in template and not image.split:
      raise ValueError(f"proposals.detections.{kind}_file {template!r} names a {{split}}, but image "
                       f"{image.file_name!r} has no split")
    path = template.replace("{split}", image.split)
    if path not in self._loaded[kind]:
      self._loaded[kind][path] = DetectionFile(path, self.match_by)
    return self._loaded[kind][path]

  def _image_boxes(self, kind: str, image: ImageInput) -> tuple[np.ndarray, np.ndarray]:
    counts = self._counts[kind]
    counts["images"] += 1
    detections = self._file(kind, image)
    if detections is None:
      return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    entries = detections.lookup(image)  # [n]
    boxes, scores = detections.boxes[entries], detections.scores[entries]  # [n, 4], [n]
    counts["matched"] += len(entries)
    keep = scores >= self.score_threshold
    counts["below_threshold"] += int((~keep).sum())
    boxes, scores = boxes[keep], scores[keep]
    clipped = np.clip(boxes, 0.0, [image.width, image.height, image.width, image.height])
    counts["clipped"] += int(np.any(clipped != boxes, axis=1).sum())
    has_area = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    counts["empty"] += int((~has_area).sum())
    boxes, scores = clipped[has_area], scores[has_area]
    order = np.argsort(-scores, kind="stable")
    if self.top_k:
      counts["beyond_top_k"] += max(0, len(order) - self.top_k)
      order = order[:self.top_k]
    counts["kept"] += len(order)
    counts["images_with_boxes"] += int(len(order) > 0)
    return boxes[order].astype(np.float32), scores[order].astype(np.float32)

  def __call__(self, images: Sequence[ImageInput]) -> list[ImageProposals]:
    out = []
    for image in images:
      (object_boxes, object_scores), (part_boxes, part_scores) = (self._image_boxes(kind, image) for kind in KINDS)
      out.append(ImageProposals(object_boxes, part_boxes, object_scores, part_scores))
    return out

  def report(self) -> dict:
    """What this instance counted, JSON-ready: per kind the counters and, per file read, the keys that matched.

    Reports of instances that saw disjoint images (prepare_data's shards) combine with `merge_reports`.
    """
    return {"counts": {kind: dict(self._counts[kind]) for kind in KINDS},
            "matched": {kind: {path: sorted(loaded.matched) for path, loaded in self._loaded[kind].items()}
                        for kind in KINDS}}

  def summary(self, report: dict | None = None) -> dict:
    """Counts per kind plus, per file, its entries, distinct ids and the ids that matched no image (the first
    UNMATCHED_SHOWN by name). `report` (default: this instance's) may be a `merge_reports` result."""
    report = self.report() if report is None else report
    out = {}
    for kind in KINDS:
      files = {}
      for path, matched in report["matched"][kind].items():
        detections = self._loaded[kind].get(path) or DetectionFile(path, self.match_by)
        unmatched = detections.unmatched(matched)
        files[path] = {"entries": len(detections.scores), "ids": len(detections.by_key),
                       "unmatched_ids": len(unmatched), "unmatched": unmatched[:UNMATCHED_SHOWN]}
      out[kind] = {**report["counts"][kind], "files": files}
    return out

  def summary_lines(self) -> list[str]:
    """What scripts print after a run (`format_summary` of this instance's summary)."""
    return format_summary(self.summary())


def merge_reports(reports: Sequence[dict]) -> dict:
  """One report from several `DetectionFiles.report()`s: counters summed, matched keys united per file."""
  counts = {kind: collections.Counter({name: 0 for name in COUNTERS}) for kind in KINDS}
  matched: dict[str, dict[str, set]] = {kind: collections.defaultdict(set) for kind in KINDS}
  for report in reports:
    for kind in KINDS:
      counts[kind].update(report["counts"][kind])
      for path, keys in report["matched"][kind].items():
        matched[kind][path].update(keys)
  return {"counts": {kind: dict(counts[kind]) for kind in KINDS},
          "matched": {kind: {path: sorted(keys) for path, keys in matched[kind].items()} for kind in KINDS}}


def format_summary(summary: dict) -> list[str]:
  """Printable lines of a `DetectionFiles.summary()`."""
  lines = []
  for kind in KINDS:
    c = summary[kind]
    lines.append(f"{kind} detections: {c['kept']} boxes kept on {c['images_with_boxes']} of {c['images']} images "
                 f"({c['matched']} matched; dropped {c['below_threshold']} below the score threshold, {c['empty']} "
                 f"empty after clipping, {c['beyond_top_k']} beyond top-k; {c['clipped']} clipped to the image)")
    for path, found in c["files"].items():
      named = ", ".join(repr(k) for k in found["unmatched"])
      more = f" (first {len(found['unmatched'])}: {named})" if found["unmatched"] else ""
      lines.append(f"  {path}: {found['entries']} entries, {found['ids']} ids, {found['unmatched_ids']} ids match "
                   f"no image{more}")
  return lines
