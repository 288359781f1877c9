"""Eval config: RefCOCOg (UMD splits).

    python scripts/eval.py --config configs/eval/refcocog.py[:split,...] --config.predictions=FILE \
        --config.data_dir=DIR
"""

from __future__ import annotations

import ml_collections

from configs.eval import base

SPLITS = ("val", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.eval_config(evaluator="refcoco", dataset="refcocog", reader="refcocog", splits=SPLITS, arg=arg,
                          benchmark="refcocog")
