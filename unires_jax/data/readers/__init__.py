"""Readers of the RES dataset layouts (refer, gRefCOCO, CRIS, MRES-32M), yielding image records of docs/DESIGN.md.

`DATASETS.lookup(name)(data_dir, split, **options)` iterates records, one per image, in image-id order. Masks
become compressed RLE (pycocotools), boxes become (x0, y0, x1, y1), every ref gets a granularity. Malformed input
raises `MalformedEntryError` naming the file and entry; with `skip_bad=True` the entry is dropped and counted in
`bad` (a `BadEntries`), so the counts reach index.json. data/README.md describes each layout.

One module per layout (`refer.py`, `grefcoco.py`, `cris.py`, `mres.py`) over shared parts: `errors.py`,
`fields.py` (one entry's fields), `plans.py` (per-image plans and shards), `coco.py` (what refer and gRefCOCO
share) and `registry.py` (`DATASETS`). This module registers the layouts and is the one callers import.
"""

from __future__ import annotations

from unires_jax.data.readers.coco import (IMAGE_DIR_PROBES, IMAGE_FOLDERS, _coco_plans, _dataset_dir,
                                          image_dir_candidates, pick_image_dir, read_coco_refs)
from unires_jax.data.readers.cris import (_cris_sources, _image_id_from_name, read_cris,
                                          segment_annotation_and_ref)
from unires_jax.data.readers.errors import BadEntries, MalformedEntryError
from unires_jax.data.readers.fields import (BOX_TOLERANCE_PX, _box, _fit_box, _get, _load_json, _read_image,
                                            _rle_to_record, _sentences, _upright, _xywh_to_xyxy,
                                            segmentation_to_rle)
from unires_jax.data.readers.grefcoco import _grefcoco_sources, read_grefcoco
from unires_jax.data.readers.mres import _mres_sources, read_mres
from unires_jax.data.readers.plans import _emit, _ImagePlan, _plan_bad
from unires_jax.data.readers.refer import _refer_sources, read_refer
from unires_jax.data.readers.registry import DATASETS, DatasetReader, in_subfolder, register

register("refcoco", read_refer, _refer_sources, dataset="refcoco", split_by="unc")
register("refcoco+", read_refer, _refer_sources, dataset="refcoco+", split_by="unc")
register("refcocog", read_refer, _refer_sources, dataset="refcocog", split_by="umd")
register("grefcoco", read_grefcoco, _grefcoco_sources, dataset="grefcoco", split_by="unc")
register("refcocom_cris", read_cris, _cris_sources, dataset="refcocom", name="refcocom")
register("cris", read_cris, _cris_sources)
register("mres32m", read_mres, _mres_sources, dataset="mres32m")

# Callers (refcocom.py, synthetic.py, prepare_data, tests) reach the shared helpers through this module.
__all__ = [
    "BOX_TOLERANCE_PX", "BadEntries", "DATASETS", "DatasetReader", "IMAGE_DIR_PROBES", "IMAGE_FOLDERS",
    "MalformedEntryError", "_ImagePlan", "_box", "_coco_plans", "_cris_sources", "_dataset_dir", "_emit",
    "_fit_box", "_get", "_grefcoco_sources", "_image_id_from_name", "_load_json", "_mres_sources", "_plan_bad",
    "_read_image", "_refer_sources", "_rle_to_record", "_sentences", "_upright", "_xywh_to_xyxy",
    "image_dir_candidates", "in_subfolder", "pick_image_dir", "read_coco_refs", "read_cris", "read_grefcoco",
    "read_mres", "read_refer", "register", "segment_annotation_and_ref", "segmentation_to_rle",
]
