"""The gRefCOCO layout: `grefs({split_by}).json` (multi-object and no-target refs) + COCO `instances.json`."""

from __future__ import annotations

import os
from typing import Iterator

from unires_jax.data.readers.coco import _dataset_dir, read_coco_refs
from unires_jax.data.readers.errors import BadEntries, MalformedEntryError
from unires_jax.data.readers.fields import _get, _load_json, _sentences


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

  return read_coco_refs(dataset, split, data_dir, dataset_dir, refs_path, raw_refs, image_dir, normalise, bad,
                        skip_bad, shard)


def _grefcoco_sources(data_dir, split, *, split_by="unc", dataset="grefcoco", **_):
  folder = _dataset_dir(data_dir, dataset, f"grefs({split_by}).json")
  return [os.path.join(folder, "instances.json"), os.path.join(folder, f"grefs({split_by}).json")]
