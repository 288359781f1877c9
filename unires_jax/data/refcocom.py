"""RefCOCOm as released: `annotations/{split}.json`, `masks/{segment_id}.png`, COCO train2014 images by `img_name`.

The release (MRES authors, "follows CRIS's data processing"; the layout public evaluators read) ships each
benchmark split twice: `{val,testA,testB}_part_only` (part references; the paper's *Part* mIoU) and
`{val,testA,testB}_object_part` (object and part references; *Obj & Part* mIoU). The file names are read as
they are: the reader's `split` is one of `RELEASE_SPLITS`. Entries follow CRIS, `{img_name, segment_id,
sentences, bbox [x0, y0, x1, y1], cat, sentences_num}`, with `sentences` as `[{idx, sent_id, sent}]` or as plain
strings (whose `sent_id` is then their position in the list). Registered in `readers.DATASETS` as `refcocom`.

**[interpretation]** The release carries no per-entry part flag. Every entry of a `*_part_only` file is a part;
an entry of a `*_object_part` file is a part when it says `granularity: 'part'` or its `cat` is in
`part_categories`, else an object. The paper's two numbers do not depend on this: each is the mIoU over all
references of its file.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from unires_jax.data import readers, records

BENCHMARK_SPLITS = ("val", "testA", "testB")
# Release set → the paper's column it is scored for.
RELEASE_SETS = {"part_only": "Part", "object_part": "Obj&Part"}
RELEASE_SPLITS = tuple(f"{split}_{kind}" for split in BENCHMARK_SPLITS for kind in RELEASE_SETS)


def release_splits(benchmark_splits: Sequence[str]) -> list[str]:
  """`['val', 'testA']` → `['val_part_only', 'val_object_part', 'testA_part_only', 'testA_object_part']`."""
  unknown = [s for s in benchmark_splits if s not in BENCHMARK_SPLITS]
  if unknown:
    raise ValueError(f"RefCOCOm: unknown benchmark split(s) {unknown}; expected some of {BENCHMARK_SPLITS}")
  return [f"{split}_{kind}" for split in benchmark_splits for kind in RELEASE_SETS]


def parse_release_split(name: str) -> tuple[str, str]:
  """`'testA_object_part'` → `('testA', 'Obj&Part')`: the benchmark split and the paper's column."""
  for kind, column in RELEASE_SETS.items():
    split = name[:-len(kind) - 1]
    if name.endswith(f"_{kind}") and split in BENCHMARK_SPLITS:
      return split, column
  raise ValueError(f"RefCOCOm: {name!r} is not a release split; expected one of {RELEASE_SPLITS}")


def _sentences(entry: dict, where: str) -> list[dict]:
  """CRIS sentence dicts, or plain strings (sent_id = position in the list)."""
  sentences = readers._get(entry, "sentences", where)
  if not isinstance(sentences, list) or not sentences:
    raise readers.MalformedEntryError("missing_key", f"{where}: 'sentences' must be a non-empty list")
  out = []
  for j, sentence in enumerate(sentences):
    at = f"{where} sentences[{j}]"
    if isinstance(sentence, str):
      out.append({"sent_id": j, "sent": sentence})
    else:
      out.append({"sent_id": int(readers._get(sentence, "sent_id", at)),
                  "sent": str(readers._get(sentence, "sent", at))})
  ids = [s["sent_id"] for s in out]
  if len(set(ids)) != len(ids):
    raise readers.MalformedEntryError("bad_entry", f"{where}: sent_id values {ids} repeat; expected one per "
                                      "sentence")
  return out


def _entry(entry: Any, where: str, part_only: bool, part_categories: set[str]) -> dict:
  img_name = str(readers._get(entry, "img_name", where))
  box = readers._box(readers._get(entry, "bbox", where), where, "xyxy")  # finite, x1 >= x0, y1 >= y0
  category = str(readers._get(entry, "cat", where))
  granularity = "part" if part_only else entry.get("granularity",
                                                   "part" if category in part_categories else "object")
  if granularity not in ("object", "part"):
    raise readers.MalformedEntryError("bad_entry", f"{where}: granularity must be 'object' or 'part', got "
                                      f"{granularity!r}")
  image_id = int(entry["image_id"]) if "image_id" in entry else readers._image_id_from_name(img_name, where)
  return {"where": where, "img_name": img_name, "image_id": image_id,
          "segment_id": int(readers._get(entry, "segment_id", where)), "bbox": box,
          "category": category, "granularity": granularity, "sentences": _sentences(entry, where)}


def _png_mask(path: str, height: int, width: int, where: str, img_name: str) -> np.ndarray:
  if not os.path.exists(path):
    raise readers.MalformedEntryError("missing_mask", f"{where}: mask {path} missing")
  with Image.open(path) as image:
    mask = np.asarray(image.convert("L")) > 127  # [h, w] from 0/255
  if mask.shape != (height, width):
    raise readers.MalformedEntryError("bad_mask", f"{where}: mask {path} is {mask.shape}, image {img_name} is "
                                      f"{(height, width)}")
  return mask


def read_refcocom(data_dir: str, split: str, *, image_dir: str | None = None, dataset: str = "refcocom",
                  part_categories: Sequence[str] = (), skip_bad: bool = False,
                  bad: readers.BadEntries | None = None, shard: tuple[int, int] | None = None) -> Iterator[dict]:
  """Image records of one release split (`val_part_only`, ...); `segment_id` is the ref_id and annotation id.

  `image_dir` defaults to `<data_dir>/images` (point it at COCO train2014).
  """
  if split not in RELEASE_SPLITS:
    hint = (f" (RefCOCOm ships {split} as {release_splits([split])})" if split in BENCHMARK_SPLITS else "")
    raise ValueError(f"RefCOCOm release split {split!r} unknown{hint}; expected one of {RELEASE_SPLITS}")
  bad = readers.BadEntries() if bad is None else bad
  plan_bad = readers._plan_bad(bad, shard)
  anns_path = os.path.join(data_dir, "annotations", f"{split}.json")
  entries = readers._load_json(anns_path)
  if not isinstance(entries, list):
    raise readers.MalformedEntryError("bad_entry", f"{anns_path}: expected a list of entries")
  image_dir = image_dir or os.path.join(data_dir, "images")
  part_only = split.endswith("_part_only")
  by_image, first_entry = collections.defaultdict(list), {}
  for i, raw in enumerate(entries):
    where = f"RefCOCOm annotation {anns_path} entry {i}"
    try:
      entry = _entry(raw, where, part_only, set(part_categories))
      if entry["segment_id"] in first_entry:
        raise readers.MalformedEntryError("duplicate_segment", f"{where}: segment_id {entry['segment_id']} "
                                          f"already in entry {first_entry[entry['segment_id']]}")
    except readers.MalformedEntryError as error:
      plan_bad.handle(error, skip_bad)
      continue
    first_entry[entry["segment_id"]] = i
    by_image[(entry["image_id"], entry["img_name"])].append(entry)

  def plan(image_id: int, img_name: str, image_entries: list[dict]) -> readers._ImagePlan:
    def build() -> dict | None:
      image_bytes, height, width = readers._read_image(image_dir, img_name, image_entries[0]["where"])
      annotations, refs = [], []
      for entry in image_entries:
        mask_path = os.path.join(data_dir, "masks", f"{entry['segment_id']}.png")
        try:
          mask = _png_mask(mask_path, height, width, entry["where"], img_name)
          box = readers._fit_box(entry["bbox"], height, width, entry["where"])
        except readers.MalformedEntryError as error:
          bad.handle(error, skip_bad)
          continue
        annotation, ref = readers.segment_annotation_and_ref(dict(entry, bbox=box), mask, split)
        annotations.append(annotation)
        refs.append(ref)
      if not refs:
        return None
      return {"dataset": dataset, "image_id": image_id, "file_name": img_name, "height": height, "width": width,
              "image_bytes": image_bytes, "annotations": annotations,
              "proposals": records.empty_proposals(), "refs": sorted(refs, key=lambda r: r["ref_id"])}
    return readers._ImagePlan((image_id, img_name), build)

  plans = [plan(image_id, img_name, image_entries) for (image_id, img_name), image_entries in by_image.items()]
  return readers._emit(plans, bad, skip_bad, shard)


def refcocom_sources(data_dir: str, split: str, **_) -> list[str]:
  return [os.path.join(data_dir, "annotations", f"{split}.json")]


# RefCOCOm in its released layout; `refcocom_cris` (readers/cris.py) reads the CRIS layout.
readers.register("refcocom", read_refcocom, refcocom_sources, dataset="refcocom")
