"""Referring-segmentation metrics (cIoU, mIoU, gIoU, N-acc, T-acc, Pr@X), accumulated as exact sums on host.

Per sample `I = |pred ∧ gt|` and `U = |pred ∨ gt|` at the original image resolution. The accumulator holds only
integer counts and one float64 sum per granularity, so shards of a split can be merged (or summed across
processes) and give the same numbers as one pass over the whole split. Definitions follow PAPER.md "Metrics":

- cIoU = ΣI / ΣU over every sample. A targeted sample predicted empty adds `I = 0` and its `U = |gt|`; a
  no-target sample predicted empty adds nothing; a no-target sample predicted non-empty adds `U = |pred|`.
- mIoU = mean of `I / U` over targeted samples (a targeted sample with `U = 0` scores 0).
- gIoU = mean over all samples of the per-sample score: `I / U` for a targeted sample (0 when predicted empty),
  1 for a no-target sample predicted empty, 0 for a no-target sample predicted non-empty.
- N-acc = no-target samples predicted empty / no-target samples; T-acc = targeted samples predicted non-empty /
  targeted samples.
- Pr@X = targeted samples with IoU ≥ X / targeted samples, X ∈ {0.5, ..., 0.9}, compared exactly in integers
  (`10·I ≥ k·U`).

Zero samples of a kind: a metric whose denominator is zero is NaN (never an exception). `result()` always has the
overall keys, plus `<metric>/<granularity>` keys for each granularity that has at least one sample.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import numpy as np

GRANULARITIES = ("object", "multi-object", "part", "no-target")
# Pr@X thresholds as tenths, so `IoU ≥ k/10` is the exact integer test `10·I ≥ k·U`.
PRECISION_TENTHS = (5, 6, 7, 8, 9)

# Integer counts per granularity, in this column order.
COUNT_FIELDS = ("samples", "intersection", "union", "targeted", "targeted_predicted_nonempty", "no_target",
                "no_target_predicted_empty") + tuple(f"iou_at_least_0.{k}" for k in PRECISION_TENTHS)
# Float sums per granularity: Σ I/U over targeted samples.
SUM_FIELDS = ("targeted_iou_sum",)

_COL = {name: i for i, name in enumerate(COUNT_FIELDS)}
_GRANULARITY_ROW = {name: i for i, name in enumerate(GRANULARITIES)}


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
  """`(|pred ∧ gt|, |pred ∨ gt|)` of two boolean masks of the same [h, w] shape."""
  pred = np.asarray(pred, bool)
  gt = np.asarray(gt, bool)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction mask shape {pred.shape} differs from ground-truth shape {gt.shape}")
  intersection = int(np.count_nonzero(pred & gt))
  union = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt)) - intersection
  return intersection, union


def _ratio(numerator: float, denominator: float) -> float:
  return float(numerator) / float(denominator) if denominator else math.nan


class RESMetrics:
  """Exact accumulator of referring-segmentation metrics, with a breakdown by granularity."""

  def __init__(self):
    self.counts = np.zeros((len(GRANULARITIES), len(COUNT_FIELDS)), np.int64)  # [G, C]
    self.sums = np.zeros((len(GRANULARITIES), len(SUM_FIELDS)), np.float64)    # [G, F]

  # ---- accumulation -------------------------------------------------------------------------------------------

  def update(self, pred: np.ndarray, gt: np.ndarray, has_target: bool, granularity: str) -> None:
    """Adds one sample: boolean masks [h, w] at the original image resolution."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    intersection, union = intersection_union(pred, gt)
    if not has_target and gt.any():
      raise ValueError(f"a no-target sample must have an empty ground-truth mask, got {int(gt.sum())} pixels")
    self.update_from_counts(intersection, union, pred_empty=not pred.any(), has_target=has_target,
                            granularity=granularity)

  def update_from_counts(self, intersection: int, union: int, pred_empty: bool, has_target: bool,
                         granularity: str) -> None:
    """Adds one sample from its precomputed `I`, `U` and whether the prediction is empty."""
    if granularity not in _GRANULARITY_ROW:
      raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if has_target == (granularity == "no-target"):
      raise ValueError(f"has_target={has_target} contradicts granularity {granularity!r}")
    intersection, union = int(intersection), int(union)
    if not 0 <= intersection <= union:
      raise ValueError(f"expected 0 <= intersection <= union, got I={intersection}, U={union}")
    row = self.counts[_GRANULARITY_ROW[granularity]]
    row[_COL["samples"]] += 1
    if has_target:
      row[_COL["intersection"]] += intersection
      row[_COL["union"]] += union
      row[_COL["targeted"]] += 1
      if not pred_empty:
        row[_COL["targeted_predicted_nonempty"]] += 1
        # A targeted sample predicted empty has I = 0, so it scores 0 and passes no threshold.
        if union:
          self.sums[_GRANULARITY_ROW[granularity], 0] += intersection / union
          for k in PRECISION_TENTHS:
            if 10 * intersection >= k * union:
              row[_COL[f"iou_at_least_0.{k}"]] += 1
    else:
      if intersection:
        raise ValueError(f"a no-target sample cannot have a non-zero intersection, got I={intersection}")
      row[_COL["no_target"]] += 1
      if pred_empty:
        row[_COL["no_target_predicted_empty"]] += 1
      else:
        row[_COL["union"]] += union  # |pred|: the false positive area counts against cIoU

  def merge(self, other: "RESMetrics") -> "RESMetrics":
    """Adds another accumulator's samples into this one; returns self."""
    self.counts += other.counts
    self.sums += other.sums
    return self

  # ---- cross-process reduction --------------------------------------------------------------------------------

  def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(int64 counts [G, C], float64 sums [G, F]): the whole state, for a cross-process sum."""
    return self.counts.copy(), self.sums.copy()

  @classmethod
  def from_arrays(cls, counts: np.ndarray, sums: np.ndarray) -> "RESMetrics":
    metrics = cls()
    counts = np.asarray(counts)
    sums = np.asarray(sums)
    if counts.shape != metrics.counts.shape or sums.shape != metrics.sums.shape:
      raise ValueError(f"RESMetrics arrays: expected counts {metrics.counts.shape} and sums {metrics.sums.shape}, "
                       f"got {counts.shape} and {sums.shape}")
    metrics.counts = counts.astype(np.int64)
    metrics.sums = sums.astype(np.float64)
    return metrics

  # ---- results ------------------------------------------------------------------------------------------------

  def _summary(self, counts: np.ndarray, targeted_iou_sum: float) -> dict[str, float]:
    c = {name: int(counts[i]) for i, name in enumerate(COUNT_FIELDS)}
    out = {
        "cIoU": _ratio(c["intersection"], c["union"]),
        "mIoU": _ratio(targeted_iou_sum, c["targeted"]),
        "gIoU": _ratio(targeted_iou_sum + c["no_target_predicted_empty"], c["samples"]),
        "N-acc": _ratio(c["no_target_predicted_empty"], c["no_target"]),
        "T-acc": _ratio(c["targeted_predicted_nonempty"], c["targeted"]),
    }
    for k in PRECISION_TENTHS:
      out[f"Pr@0.{k}"] = _ratio(c[f"iou_at_least_0.{k}"], c["targeted"])
    return {name: 100.0 * value for name, value in out.items()}

  def result(self) -> dict[str, float]:
    """Metrics ×100: overall keys always, `<metric>/<granularity>` for granularities with samples; NaN when
    a metric's denominator is zero."""
    out = self._summary(self.counts.sum(0), float(self.sums[:, 0].sum()))
    for g, name in enumerate(GRANULARITIES):
      if self.counts[g, _COL["samples"]]:
        for metric, value in self._summary(self.counts[g], float(self.sums[g, 0])).items():
          out[f"{metric}/{name}"] = value
    return out

  def sample_counts(self) -> dict[str, int]:
    """How many samples went in: `samples`, `targeted`, `no_target`, and `samples/<granularity>`."""
    total = self.counts.sum(0)
    out = {"samples": int(total[_COL["samples"]]), "targeted": int(total[_COL["targeted"]]),
           "no_target": int(total[_COL["no_target"]])}
    for g, name in enumerate(GRANULARITIES):
      out[f"samples/{name}"] = int(self.counts[g, _COL["samples"]])
    return out


def merge_all(parts: Iterable[RESMetrics]) -> RESMetrics:
  total = RESMetrics()
  for part in parts:
    total.merge(part)
  return total


def _default_allgather(tree):
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree)


def allreduce(metrics: RESMetrics, allgather: Callable | None = None, process_count: int | None = None
              ) -> RESMetrics:
  """The sum of every process's accumulator, identical on all processes; a no-op on one process.

  The int64 / float64 state travels bit-exactly as uint32 words (JAX without x64 would otherwise narrow it to
  32 bits), is gathered from every process and summed on host in process order.
  """
  if process_count is None:
    import jax
    process_count = jax.process_count()
  if process_count == 1:
    return metrics
  counts, sums = metrics.to_arrays()
  words = {"counts": counts.view(np.uint32), "sums": sums.view(np.uint32)}  # [G, 2C], [G, 2F]
  gathered = (allgather or _default_allgather)(words)  # each [P, ...]
  all_counts = np.ascontiguousarray(np.asarray(gathered["counts"], np.uint32)).view(np.int64)  # [P, G, C]
  all_sums = np.ascontiguousarray(np.asarray(gathered["sums"], np.uint32)).view(np.float64)    # [P, G, F]
  if all_counts.shape[0] != process_count:
    raise ValueError(f"allreduce: gathered {all_counts.shape[0]} accumulators from {process_count} processes")
  total_sums = np.zeros_like(sums)
  for part in all_sums:  # a fixed order, so every process gets the same float sum
    total_sums += part
  return RESMetrics.from_arrays(all_counts.sum(0), total_sums)


def format_value(value: float) -> str:
  """A metric as it appears in tables: two decimals, `n/a` for NaN."""
  return "n/a" if math.isnan(value) else f"{value:.2f}"


def json_safe(values: Mapping[str, float]) -> dict[str, float | None]:
  """NaN → None, so metrics.json stays standard JSON."""
  return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}
