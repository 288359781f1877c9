"""Eval config: RefCOCOm (MRES) as released: `annotations/{split}.json`, `masks/{segment_id}.png`, COCO images.

    python scripts/eval.py --config configs/eval/refcocom.py[:val,testA,...] --config.predictions=FILE \
        --config.data_dir=DIR [--config.reader_options.image_dir=COCO_TRAIN2014]

The part after `:` selects benchmark splits; each is scored on the release's two files, `<split>_part_only` (the
paper's Part mIoU) and `<split>_object_part` (Obj&Part mIoU), so `config.splits` holds release file names and a
predictions line's `split` is one of them. The evaluator reports the paper's table: rows val / testA / testB,
columns Part and Obj&Part.
"""

from __future__ import annotations

import ml_collections

from configs.eval import base
from unires_jax.data import refcocom


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base.eval_config(evaluator="refcocom", dataset="refcocom", reader="refcocom",
                       splits=refcocom.BENCHMARK_SPLITS, arg=arg, benchmark="refcocom")
  c.splits = refcocom.release_splits(c.splits)
  return c
