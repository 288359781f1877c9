"""The CRIS layout (RefCOCOm as CRIS ships it): `anns/{name}/{split}.json` + `masks/{name}/{segment_id}.png`."""

from __future__ import annotations

import collections
import os
import re
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from unires_jax.data import records
from unires_jax.data.readers.errors import BadEntries, MalformedEntryError
from unires_jax.data.readers.fields import _box, _fit_box, _get, _load_json, _read_image, _rle_to_record, _sentences
from unires_jax.data.readers.plans import _emit, _ImagePlan, _plan_bad


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
