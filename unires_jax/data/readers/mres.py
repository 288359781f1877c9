"""The MRES-32M layout: `annotations/{split}/{image_id}.json` per image, one ref per captioned annotation."""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterator

from unires_jax.data import records
from unires_jax.data.readers.errors import BadEntries, MalformedEntryError
from unires_jax.data.readers.fields import _fit_box, _get, _load_json, _read_image, _xywh_to_xyxy, segmentation_to_rle
from unires_jax.data.readers.plans import _emit, _ImagePlan


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
