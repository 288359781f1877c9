"""The trivial baselines of a split: the metrics an all-empty and an all-foreground prediction get."""

from __future__ import annotations

import numpy as np

from unires_jax.data import records as records_lib
from unires_jax.eval import metrics as metrics_lib


def trivial_baselines(split_dir: str) -> dict[str, dict[str, float]]:
  """The same metrics for an all-empty and an all-foreground prediction: what a learning model must beat."""
  source = records_lib.SplitSource(split_dir)
  empty, full = metrics_lib.RESMetrics(), metrics_lib.RESMetrics()
  for index in range(len(source)):
    sample = source.sample(index)
    record, ref = sample["record"], sample["ref"]
    gt = records_lib.ground_truth_mask(record, ref)
    has_target = bool(ref["ann_ids"])
    empty.update(np.zeros_like(gt), gt, has_target=has_target, granularity=ref["granularity"])
    full.update(np.ones_like(gt), gt, has_target=has_target, granularity=ref["granularity"])
  return {"empty_mask": empty.result(), "whole_image": full.result()}
