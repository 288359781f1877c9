"""Eval config: the synthetic set (`python -m unires_jax.data.synthetic --out DIR`).

The set is written in several layouts; the default reader `synthetic_grefcoco` holds its object, multi-object and
no-target refs, `--config.reader=synthetic_cris` its object and part refs (RefCOCOm-like).

    python scripts/eval.py --config configs/eval/synthetic.py[:split,...] --config.predictions=FILE \
        --config.data_dir=DIR
"""

from __future__ import annotations

import ml_collections

from configs.eval import base

SPLITS = ("val", "testA", "testB")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.eval_config(evaluator="synthetic", dataset="synthetic", reader="synthetic_grefcoco", splits=SPLITS,
                          arg=arg, benchmark="synthetic")
