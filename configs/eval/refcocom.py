"""Eval config: RefCOCOm (MRES, CRIS layout: anns/refcocom, masks/refcocom).

    python scripts/eval.py --config configs/eval/refcocom.py[:split,...] --config.predictions=FILE \
        --config.data_dir=DIR
"""

from __future__ import annotations

import ml_collections

from configs.eval import base

SPLITS = ("val", "testA", "testB")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.eval_config(evaluator="refcocom", dataset="refcocom", reader="refcocom", splits=SPLITS, arg=arg,
                          benchmark="refcocom")
