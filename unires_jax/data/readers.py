"""Readers of the RES dataset layouts (refer, gRefCOCO, CRIS, MRES-32M), yielding image records of docs/DESIGN.md.

`DATASETS.lookup(name)(data_dir, split, **options)` iterates records, one per image, in image-id order. Masks
become compressed RLE (pycocotools), boxes become (x0, y0, x1, y1), every ref gets a granularity. Malformed input
raises `MalformedEntryError` naming the file and entry; with `skip_bad=True` the entry is dropped and counted in
`bad` (a `BadEntries`), so the counts reach index.json. data/README.md describes each layout.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from unires_jax import registry
from unires_jax.data import images, records, safe_pickle

DATASETS = registry.Registry("dataset")


class MalformedEntryError(ValueError):
  """An input entry that cannot become part of a record; `kind` is the counter name used with skip_bad."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass
class BadEntries:
  """Malformed entries dropped under skip_bad: counts per kind and the messages."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list[str] = dataclasses.field(default_factory=list)

  def handle(self, error: MalformedEntryError, skip_bad: bool) -> None:
    if not skip_bad:
      raise error
    self.counts[error.kind] += 1
    self.messages.append(str(error))


@dataclasses.dataclass(frozen=True)
class _ImagePlan:
  """One image to read; `build` loads pixels and masks (the costly part) only for the shard that keeps it."""
  sort_key: Any
  build: Callable[[], dict | None]


@dataclasses.dataclass(frozen=True)
class DatasetReader:
  """A registered dataset: `__call__` iterates records; `source_files` lists the files whose checksums we keep."""
  read: Callable[..., Iterator[dict]]
  list_sources: Callable[..., list[str]]
  defaults: dict

  def __call__(self, data_dir: str, split: str, **options) -> Iterator[dict]:
    return self.read(data_dir, split, **{**self.defaults, **options})

  def source_files(self, data_dir: str, split: str, **options) -> list[str]:
    return self.list_sources(data_dir, split, **{**self.defaults, **options})


def _plan_bad(bad: BadEntries, shard: tuple[int, int] | None) -> BadEntries:
  """Entries dropped while planning are seen by every shard's reader; only shard 0 counts them."""
  return bad if shard is None or shard[0] == 0 else BadEntries()


def _emit(plans: list[_ImagePlan], bad: BadEntries, skip_bad: bool,
          shard: tuple[int, int] | None) -> Iterator[dict]:
  """Builds the plans in order; with `shard=(k, n)` only the images whose position is k mod n."""
  plans = sorted(plans, key=lambda plan: plan.sort_key)
  for position, plan in enumerate(plans):
    if shard is not None and position % shard[1] != shard[0]:
      continue
    try:
      record = plan.build()
      if record is not None:
        record = _upright(record)
    except MalformedEntryError as error:
      bad.handle(error, skip_bad)
      continue
    if record is not None:
      yield record


# ------------------------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------------- refer and gRefCOCO (COCO)


def _dataset_dir(data_dir: str, dataset: str, required: str) -> str:
  """The folder holding `required`: `data_dir` itself, or `data_dir/<dataset>` when `data_dir` is the refer
  toolkit's data root (refcoco/, refcoco+/, refcocog/ side by side). A FileNotFoundError lists both places."""
  candidates = [data_dir, os.path.join(data_dir, dataset)]
  for candidate in candidates:
    if os.path.exists(os.path.join(candidate, required)):
      return candidate
  raise FileNotFoundError(f"{dataset}: {required} not found; looked for "
                          f"{[os.path.join(c, required) for c in candidates]} (--data-dir may be the dataset folder "
                          f"or the data root that holds {dataset}/)")


# Where images sit relative to the data root: the refer toolkit (images/mscoco/images/train2014), gRefCOCO's
# ReLA layout (images/train2014), and a plain images/ folder.
IMAGE_FOLDERS = (os.path.join("images", "mscoco", "images", "train2014"), os.path.join("images", "train2014"),
                 "images")
IMAGE_DIR_PROBES = 20  # images looked up to decide which candidate folder holds a dataset's images


def image_dir_candidates(data_dir: str, dataset_dir: str) -> list[str]:
  """`<dataset folder>/images`, then the data root's refer, ReLA and plain image folders (the root is `data_dir`
  when the dataset sits in a subfolder of it, else the dataset folder's parent)."""
  root = data_dir if os.path.abspath(dataset_dir) != os.path.abspath(data_dir) else os.path.dirname(
      os.path.abspath(data_dir))
  out = [os.path.join(dataset_dir, "images")] + [os.path.join(root, folder) for folder in IMAGE_FOLDERS]
  return list(dict.fromkeys(out))


def pick_image_dir(candidates: Sequence[str], file_names: Sequence[str], what: str) -> str:
  """The first candidate folder holding one of the first `IMAGE_DIR_PROBES` file names, else the first that exists
  (its missing images are then named one by one); a FileNotFoundError listing the folders searched when none
  exists."""
  probes = list(file_names)[:IMAGE_DIR_PROBES]
  for candidate in candidates:
    if any(os.path.exists(os.path.join(candidate, name)) for name in probes):
      return candidate
  existing = [candidate for candidate in candidates if os.path.isdir(candidate)]
  if existing or not probes:
    return existing[0] if existing else candidates[0]
  raise FileNotFoundError(f"{what}: images not found (e.g. {probes[0]!r}); searched {list(candidates)}. Pass "
                          f"--image-dir with the folder that holds them (COCO train2014)")


def _coco_plans(dataset: str, split: str, instances_path: str, refs: list[tuple[str, dict]],
                image_dir: str | Sequence[str], normalise: Callable[[dict, str], dict], bad: BadEntries, skip_bad: bool,
                plan_bad: BadEntries) -> list[_ImagePlan]:
  """Plans for refs over a COCO `instances.json`; `normalise(ref, where)` → {ref_id, image_id, ann_ids, ...}.

  `image_dir` is a folder, or candidate folders of which the first holding this split's images is used.
  """
  instances = _load_json(instances_path)
  images = {int(im["id"]): im for im in _get(instances, "images", instances_path)}
  anns_by_id = {}
  anns_by_image = collections.defaultdict(list)
  for k, ann in enumerate(_get(instances, "annotations", instances_path)):
    ann_id = int(_get(ann, "id", f"{instances_path} annotations[{k}]"))
    anns_by_id[ann_id] = (k, ann)
    anns_by_image[int(ann["image_id"])].append((k, ann))
  categories = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}

  refs_by_image = collections.defaultdict(list)
  for where, raw in refs:
    try:
      if _get(raw, "split", where) != split:
        continue
      ref = normalise(raw, where)
      if ref["image_id"] not in images:
        raise MalformedEntryError("unknown_image", f"{where}: image_id {ref['image_id']} not in {instances_path}")
      for ann_id in ref["ann_ids"]:
        if ann_id not in anns_by_id:
          raise MalformedEntryError("unknown_annotation", f"{where}: ann_id {ann_id} not in {instances_path}")
    except MalformedEntryError as error:
      plan_bad.handle(error, skip_bad)
      continue
    refs_by_image[ref["image_id"]].append(ref)
  if not isinstance(image_dir, str):
    names = [str(images[i].get("file_name", "")) for i in sorted(refs_by_image)]
    image_dir = pick_image_dir(image_dir, names, f"{dataset} {split}")

  def plan(image_id: int, image_refs: list[dict]) -> _ImagePlan:
    def build() -> dict | None:
      info = images[image_id]
      where = f"{instances_path} image {image_id}"
      file_name = str(_get(info, "file_name", where))
      image_bytes, height, width = _read_image(image_dir, file_name, where)
      annotations, dropped = [], set()
      for k, ann in anns_by_image[image_id]:
        at = f"{instances_path} annotations[{k}] (id {ann['id']})"
        try:
          annotations.append({
              "ann_id": int(ann["id"]),
              "category": categories.get(int(ann.get("category_id", -1)), str(ann.get("category_id", ""))),
              "granularity": "object",
              "bbox": _fit_box(_xywh_to_xyxy(_get(ann, "bbox", at), at), height, width, at),
              "rle": segmentation_to_rle(_get(ann, "segmentation", at), height, width, at)})
        except MalformedEntryError as error:
          bad.handle(error, skip_bad)
          dropped.add(int(ann["id"]))
      kept = []
      for ref in image_refs:
        if dropped & set(ref["ann_ids"]):
          bad.handle(MalformedEntryError("ref_to_bad_annotation", f"{ref['where']}: refers to a malformed "
                                         "annotation"), skip_bad)
          continue
        kept.append({key: ref[key] for key in ("ref_id", "split", "ann_ids", "granularity", "sentences")})
      if not kept:
        return None
      return {"dataset": dataset, "image_id": image_id, "file_name": file_name, "height": height, "width": width,
              "image_bytes": image_bytes, "annotations": annotations, "proposals": records.empty_proposals(),
              "refs": sorted(kept, key=lambda r: r["ref_id"])}
    return _ImagePlan(image_id, build)

  return [plan(image_id, image_refs) for image_id, image_refs in refs_by_image.items()]


def read_refer(data_dir: str, split: str, *, split_by: str = "unc", image_dir: str | None = None,
               dataset: str = "refcoco", skip_bad: bool = False, bad: BadEntries | None = None,
               shard: tuple[int, int] | None = None) -> Iterator[dict]:
  """RefCOCO / RefCOCO+ / RefCOCOg: `refs({split_by}).p` (restricted unpickling) + `instances.json`."""
  bad = BadEntries() if bad is None else bad
  dataset_dir = _dataset_dir(data_dir, dataset, f"refs({split_by}).p")
  refs_path = os.path.join(dataset_dir, f"refs({split_by}).p")
  raw_refs = safe_pickle.load_file(refs_path)
  if not isinstance(raw_refs, list):
    raise MalformedEntryError("bad_entry", f"{refs_path}: expected a list of refs, got {type(raw_refs).__name__}")

  def normalise(ref: dict, where: str) -> dict:
    return {"ref_id": int(_get(ref, "ref_id", where)), "image_id": int(_get(ref, "image_id", where)),
            "ann_ids": [int(_get(ref, "ann_id", where))], "granularity": "object", "split": split,
            "sentences": _sentences(ref, where), "where": where}

  refs = [(f"{refs_path} entry {i}", ref) for i, ref in enumerate(raw_refs)]
  plans = _coco_plans(dataset, split, os.path.join(dataset_dir, "instances.json"), refs,
                      image_dir or image_dir_candidates(data_dir, dataset_dir), normalise, bad, skip_bad,
                      _plan_bad(bad, shard))
  return _emit(plans, bad, skip_bad, shard)


def read_grefcoco(data_dir: str, split: str, *, split_by: str = "unc", image_dir: str | None = None,
                  dataset: str = "grefcoco", skip_bad: bool = False, bad: BadEntries | None = None,
                  shard: tuple[int, int] | None = None) -> Iterator[dict]:
  """gRefCOCO: `grefs({split_by}).json` (ann_id lists, [-1] / no_target for nothing) + `instances.json`."""
  bad = BadEntries() if bad is None else bad
  dataset_dir = _dataset_dir(data_dir, dataset, f"grefs({split_by}).json")
  refs_path = os.path.join(dataset_dir, f"grefs({split_by}).json")
  raw_refs = _load_json(refs_path)

  def normalise(ref: dict, where: str) -> dict:
    ann_ids = _get(ref, "ann_id", where)
    ann_ids = [int(a) for a in (ann_ids if isinstance(ann_ids, list) else [ann_ids])]
    no_target = bool(ref.get("no_target", False)) or ann_ids == [-1] or not ann_ids
    if no_target:
      ann_ids = []
    elif -1 in ann_ids:
      raise MalformedEntryError("bad_entry", f"{where}: ann_id mixes -1 (no target) with targets {ann_ids}")
    granularity = "no-target" if no_target else "multi-object" if len(ann_ids) > 1 else "object"
    return {"ref_id": int(_get(ref, "ref_id", where)), "image_id": int(_get(ref, "image_id", where)),
            "ann_ids": ann_ids, "granularity": granularity, "split": split, "sentences": _sentences(ref, where),
            "where": where}

  refs = [(f"{refs_path} entry {i}", ref) for i, ref in enumerate(raw_refs)]
  plans = _coco_plans(dataset, split, os.path.join(dataset_dir, "instances.json"), refs,
                      image_dir or image_dir_candidates(data_dir, dataset_dir), normalise, bad, skip_bad,
                      _plan_bad(bad, shard))
  return _emit(plans, bad, skip_bad, shard)


def _refer_sources(data_dir, split, *, split_by="unc", dataset="refcoco", **_):
  folder = _dataset_dir(data_dir, dataset, f"refs({split_by}).p")
  return [os.path.join(folder, "instances.json"), os.path.join(folder, f"refs({split_by}).p")]


def _grefcoco_sources(data_dir, split, *, split_by="unc", dataset="grefcoco", **_):
  folder = _dataset_dir(data_dir, dataset, f"grefs({split_by}).json")
  return [os.path.join(folder, "instances.json"), os.path.join(folder, f"grefs({split_by}).json")]


# ------------------------------------------------------------------------------------------ CRIS / RefCOCOm

_TRAILING_NUMBER = re.compile(r"(\d+)(?=\.[A-Za-z]+$)")


def _image_id_from_name(img_name: str, where: str) -> int:
  match = _TRAILING_NUMBER.search(img_name)
  if match is None:
    raise MalformedEntryError("bad_entry", f"{where}: cannot read an image id from img_name {img_name!r} "
                              "(expected a number before the extension, as in COCO_train2014_000000123456.jpg)")
  return int(match.group(1))


def segment_annotation_and_ref(entry: dict, mask: np.ndarray, split: str) -> tuple[dict, dict]:
  """A CRIS-style entry (segment_id, category, granularity, bbox, sentences) and its mask [h, w] → the record's
  annotation and ref; the segment_id is both ids."""
  rle = _rle_to_record(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
  annotation = {"ann_id": entry["segment_id"], "category": entry["category"], "granularity": entry["granularity"],
                "bbox": entry["bbox"], "rle": rle}
  ref = {"ref_id": entry["segment_id"], "split": split, "ann_ids": [entry["segment_id"]],
         "granularity": entry["granularity"], "sentences": entry["sentences"]}
  return annotation, ref


def read_cris(data_dir: str, split: str, *, name: str = "refcocom", image_dir: str | None = None,
              dataset: str | None = None, part_categories: Sequence[str] = (), skip_bad: bool = False,
              bad: BadEntries | None = None, shard: tuple[int, int] | None = None) -> Iterator[dict]:
  """CRIS layout: `anns/{name}/{split}.json` entries + `masks/{name}/{segment_id}.png`; segment_id is the ref_id.

  An entry is a part reference when it says `granularity: 'part'`, or when its `cat` is in `part_categories`.
  """
  bad = BadEntries() if bad is None else bad
  anns_path = os.path.join(data_dir, "anns", name, f"{split}.json")
  entries = _load_json(anns_path)
  if not isinstance(entries, list):
    raise MalformedEntryError("bad_entry", f"{anns_path}: expected a list of entries")
  image_dir = image_dir or os.path.join(data_dir, "images")
  part_categories = set(part_categories)
  by_image = collections.defaultdict(list)
  for i, entry in enumerate(entries):
    where = f"CRIS annotation {anns_path} entry {i}"
    try:
      img_name = str(_get(entry, "img_name", where))
      image_id = int(entry["image_id"]) if "image_id" in entry else _image_id_from_name(img_name, where)
      segment_id = int(_get(entry, "segment_id", where))
      box = _box(_get(entry, "bbox", where), where, "xyxy")
      category = str(_get(entry, "cat", where))
      granularity = entry.get("granularity", "part" if category in part_categories else "object")
      if granularity not in ("object", "part"):
        raise MalformedEntryError("bad_entry", f"{where}: granularity must be 'object' or 'part', got "
                                  f"{granularity!r}")
      by_image[(image_id, img_name)].append({
          "where": where, "segment_id": segment_id, "bbox": box, "category": category,
          "granularity": granularity, "sentences": _sentences(entry, where)})
    except MalformedEntryError as error:
      _plan_bad(bad, shard).handle(error, skip_bad)

  def plan(image_id: int, img_name: str, image_entries: list[dict]) -> _ImagePlan:
    def build() -> dict | None:
      image_bytes, height, width = _read_image(image_dir, img_name, image_entries[0]["where"])
      annotations, refs = [], []
      for entry in image_entries:
        mask_path = os.path.join(data_dir, "masks", name, f"{entry['segment_id']}.png")
        try:
          if not os.path.exists(mask_path):
            raise MalformedEntryError("missing_mask", f"{entry['where']}: mask {mask_path} missing")
          mask = np.asarray(Image.open(mask_path).convert("L")) > 127  # [h, w] from 0/255
          if mask.shape != (height, width):
            raise MalformedEntryError("bad_mask", f"{entry['where']}: mask {mask_path} is {mask.shape}, image "
                                      f"{img_name} is {(height, width)}")
          box = _fit_box(entry["bbox"], height, width, entry["where"])
        except MalformedEntryError as error:
          bad.handle(error, skip_bad)
          continue
        annotation, ref = segment_annotation_and_ref(dict(entry, bbox=box), mask, split)
        annotations.append(annotation)
        refs.append(ref)
      if not refs:
        return None
      return {"dataset": dataset or name, "image_id": image_id, "file_name": img_name, "height": height,
              "width": width, "image_bytes": image_bytes, "annotations": annotations,
              "proposals": records.empty_proposals(), "refs": sorted(refs, key=lambda r: r["ref_id"])}
    return _ImagePlan((image_id, img_name), build)

  plans = [plan(image_id, img_name, image_entries) for (image_id, img_name), image_entries in by_image.items()]
  return _emit(plans, bad, skip_bad, shard)


def _cris_sources(data_dir, split, *, name="refcocom", **_):
  return [os.path.join(data_dir, "anns", name, f"{split}.json")]


# ------------------------------------------------------------------------------------------------ MRES-32M


def read_mres(data_dir: str, split: str, *, image_dir: str | None = None, dataset: str = "mres32m",
              skip_bad: bool = False, bad: BadEntries | None = None,
              shard: tuple[int, int] | None = None) -> Iterator[dict]:
  """MRES-32M layout: `annotations/{split}/{image_id}.json` per image; each captioned annotation is one ref."""
  bad = BadEntries() if bad is None else bad
  folder = os.path.join(data_dir, "annotations", split)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"MRES-32M annotation folder {folder} missing")
  image_dir = image_dir or os.path.join(data_dir, "images")

  def plan(path: str) -> _ImagePlan:
    def build() -> dict | None:
      content = _load_json(path)
      info = _get(content, "image", path)
      image_id = int(_get(info, "image_id", f"{path} image"))
      file_name = str(_get(info, "file_name", f"{path} image"))
      image_bytes, height, width = _read_image(image_dir, file_name, path)
      annotations, refs = [], []
      for k, ann in enumerate(_get(content, "annotations", path)):
        at = f"MRES-32M annotation {path} annotations[{k}]"
        try:
          granularity = _get(ann, "granularity", at)
          if granularity not in ("object", "part"):
            raise MalformedEntryError("bad_entry", f"{at}: granularity must be 'object' or 'part', got "
                                      f"{granularity!r}")
          ann_id = int(_get(ann, "id", at))
          annotation = {"ann_id": ann_id, "category": str(_get(ann, "category", at)), "granularity": granularity,
                        "bbox": _fit_box(_xywh_to_xyxy(_get(ann, "bbox", at), at), height, width, at),
                        "rle": segmentation_to_rle(_get(ann, "segmentation", at), height, width, at)}
          sentences = [{"sent_id": int(_get(c, "caption_id", f"{at} captions[{j}]")),
                        "sent": str(_get(c, "text", f"{at} captions[{j}]"))}
                       for j, c in enumerate(ann.get("captions", []))]
        except MalformedEntryError as error:
          bad.handle(error, skip_bad)
          continue
        annotations.append(annotation)
        if sentences:
          refs.append({"ref_id": ann_id, "split": split, "ann_ids": [ann_id], "granularity": granularity,
                       "sentences": sentences})
      if not refs:
        return None
      return {"dataset": dataset, "image_id": image_id, "file_name": file_name, "height": height, "width": width,
              "image_bytes": image_bytes, "annotations": annotations, "proposals": records.empty_proposals(),
              "refs": refs}
    return _ImagePlan(os.path.basename(path), build)

  paths = glob.glob(os.path.join(folder, "*.json"))
  # Numeric file names sort by number so record order follows image ids.
  plans = [plan(p) for p in paths]
  plans = [dataclasses.replace(p, sort_key=(len(p.sort_key), p.sort_key)) for p in plans]
  return _emit(plans, bad, skip_bad, shard)


def _mres_sources(data_dir, split, **_):
  return []


# ---------------------------------------------------------------------------------------------- registry


def register(dataset_name: str, read, sources, **defaults) -> None:
  """Adds a layout to `DATASETS` (readers of other modules, e.g. refcocom.py and synthetic.py, register themselves)."""
  DATASETS.register(dataset_name)(DatasetReader(read, sources, defaults))


register("refcoco", read_refer, _refer_sources, dataset="refcoco", split_by="unc")
register("refcoco+", read_refer, _refer_sources, dataset="refcoco+", split_by="unc")
register("refcocog", read_refer, _refer_sources, dataset="refcocog", split_by="umd")
register("grefcoco", read_grefcoco, _grefcoco_sources, dataset="grefcoco", split_by="unc")
register("refcocom_cris", read_cris, _cris_sources, dataset="refcocom", name="refcocom")
register("cris", read_cris, _cris_sources)
register("mres32m", read_mres, _mres_sources, dataset="mres32m")


def in_subfolder(read, sources, subdir: str, **defaults) -> DatasetReader:
  """A layout read from a sub-folder of one root (`data_dir`) whose images live in `<root>/images` (the synthetic
  set writes all four layouts so)."""
  def read_synthetic(data_dir, split, **options):
    options.setdefault("image_dir", os.path.join(data_dir, "images"))
    return read(os.path.join(data_dir, subdir), split, **options)

  def synthetic_sources(data_dir, split, **options):
    return sources(os.path.join(data_dir, subdir), split, **options)

  return DatasetReader(read_synthetic, synthetic_sources, dict(defaults))
