"""Eval config: gRefCOCO (generalized RES: multi- and no-target).

    python scripts/eval.py --config configs/eval/grefcoco.py[:split,...] --config.predictions=FILE \
        --config.data_dir=DIR
"""

from __future__ import annotations

import ml_collections

from configs.eval import base

SPLITS = ("val", "testA", "testB")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.eval_config(evaluator="grefcoco", dataset="grefcoco", reader="grefcoco", splits=SPLITS, arg=arg,
                          benchmark="grefcoco")
