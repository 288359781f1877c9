"""What refer and gRefCOCO share: COCO `instances.json` plans, the dataset folder and the image folder."""

from __future__ import annotations

import collections
import os
from typing import Callable, Iterator, Sequence

from unires_jax.data import records
from unires_jax.data.readers.errors import BadEntries, MalformedEntryError
from unires_jax.data.readers.fields import _fit_box, _get, _load_json, _read_image, _xywh_to_xyxy, segmentation_to_rle
from unires_jax.data.readers.plans import _emit, _ImagePlan, _plan_bad


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


def read_coco_refs(dataset: str, split: str, data_dir: str, dataset_dir: str, refs_path: str, raw_refs: list,
                   image_dir: str | None, normalise: Callable[[dict, str], dict], bad: BadEntries, skip_bad: bool,
                   shard: tuple[int, int] | None) -> Iterator[dict]:
  """Records of `raw_refs` (the entries of `refs_path`) over `<dataset_dir>/instances.json`; images from
  `image_dir`, else from the first of `image_dir_candidates` that holds them."""
  refs = [(f"{refs_path} entry {i}", ref) for i, ref in enumerate(raw_refs)]
  plans = _coco_plans(dataset, split, os.path.join(dataset_dir, "instances.json"), refs,
                      image_dir or image_dir_candidates(data_dir, dataset_dir), normalise, bad, skip_bad,
                      _plan_bad(bad, shard))
  return _emit(plans, bad, skip_bad, shard)
