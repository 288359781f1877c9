"""The refer layout (RefCOCO, RefCOCO+, RefCOCOg): `refs({split_by}).p` + COCO `instances.json`."""

from __future__ import annotations

import os
from typing import Iterator

from unires_jax.data import safe_pickle
from unires_jax.data.readers.coco import _dataset_dir, read_coco_refs
from unires_jax.data.readers.errors import BadEntries, MalformedEntryError
from unires_jax.data.readers.fields import _get, _sentences


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

  return read_coco_refs(dataset, split, data_dir, dataset_dir, refs_path, raw_refs, image_dir, normalise, bad,
                        skip_bad, shard)


def _refer_sources(data_dir, split, *, split_by="unc", dataset="refcoco", **_):
  folder = _dataset_dir(data_dir, dataset, f"refs({split_by}).p")
  return [os.path.join(folder, "instances.json"), os.path.join(folder, f"refs({split_by}).p")]
