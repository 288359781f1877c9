"""Offline scoring: a predictions.jsonl file against a benchmark's ground truth, with no model.

Ground truth comes from the dataset readers (`unires_jax.data.datasets.DATASETS`, the real layouts under
`data_dir`), one split at a time, streamed record by record; each ref's mask is built once for all its sentences.
Every (ref_id, sent_id) of a split must be predicted exactly once: missing, duplicate and unknown entries are
reported by name and count, and the score is never computed on a subset. Unless `allow_missing` is set, any of
them is an error; with it, missing samples are scored as empty predictions (so the score still covers the whole
split), duplicates keep their first line and unknown entries are ignored, all of them listed in the report.

The report says how the predictions were made (`provenance.MadeWith`, read from the predictions file's sidecar,
"unknown" without one); predictions made with ground-truth boxes are refused unless `allow_gt_boxes`. Lines that
carry `invalid` (answers that could not be parsed) are counted per split.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from unires_jax.data import records as records_lib
from unires_jax.eval import evaluators as evaluators_lib
from unires_jax.eval import metrics as metrics_lib
from unires_jax.eval import predictions as predictions_lib
from unires_jax.eval import provenance

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (ref_id, sent_id)
# How many names of each kind of problem a message or report lists.
NAMES_SHOWN = 20


class ScoringError(ValueError):
  """Predictions that do not cover a split exactly, or that do not fit its ground truth."""


@dataclasses.dataclass
class Coverage:
  """How a split's predictions cover its ground-truth samples."""
  split: str
  samples: int = 0
  missing: list[Key] = dataclasses.field(default_factory=list)
  duplicate: list[Key] = dataclasses.field(default_factory=list)  # one entry per extra line
  unknown: list[Key] = dataclasses.field(default_factory=list)

  @property
  def complete(self) -> bool:
    return not (self.missing or self.duplicate or self.unknown)

  def problems(self) -> list[str]:
    lines = []
    for kind, keys in (("missing", self.missing), ("duplicate", self.duplicate), ("unknown", self.unknown)):
      if keys:
        shown = ", ".join(f"(ref_id={r}, sent_id={s})" for r, s in keys[:NAMES_SHOWN])
        more = f", ... {len(keys) - NAMES_SHOWN} more" if len(keys) > NAMES_SHOWN else ""
        lines.append(f"split {self.split}: {len(keys)} {kind} (ref_id, sent_id) entries: {shown}{more}")
    return lines

  def to_json(self) -> dict:
    return {"samples": self.samples,
            **{f"num_{kind}": len(getattr(self, kind)) for kind in ("missing", "duplicate", "unknown")},
            **{kind: [list(k) for k in getattr(self, kind)[:NAMES_SHOWN]]
               for kind in ("missing", "duplicate", "unknown")}}


@dataclasses.dataclass
class SplitScore:
  split: str
  metrics: metrics_lib.RESMetrics
  coverage: Coverage
  invalid: int | None = None  # unparsable answers among the scored lines; None when no line says


def group_predictions(path: str, dataset: str, splits: Sequence[str]
                      ) -> tuple[dict[str, dict[Key, tuple[int, predictions_lib.Prediction]]],
                                 dict[str, list[Key]], collections.Counter]:
  """Reads a predictions file: {split: {key: (line, prediction)}} for the scored splits (first line wins),
  {split: [duplicate keys]}, and a count of lines per split that is not scored."""
  by_split = {split: {} for split in splits}
  duplicates = {split: [] for split in splits}
  other_splits = collections.Counter()
  for number, prediction in predictions_lib.iter_predictions(path):
    if prediction.dataset != dataset:
      raise ScoringError(f"predictions {path} line {number}: field 'dataset' is {prediction.dataset!r}, "
                         f"expected {dataset!r}")
    if prediction.split not in by_split:
      other_splits[prediction.split] += 1
      continue
    entries = by_split[prediction.split]
    if prediction.key in entries:
      duplicates[prediction.split].append(prediction.key)
    else:
      entries[prediction.key] = (number, prediction)
  return by_split, duplicates, other_splits


def ground_truth_samples(records: Iterable[dict], split: str, where: str
                         ) -> Iterator[tuple[Key, np.ndarray, bool, str]]:
  """(key, gt mask bool [h, w], has_target, granularity) for every sentence of every ref of `split`, in record
  order; a ref's mask is built once and shared by its sentences."""
  seen: set[Key] = set()
  for record in records:
    for ref in record["refs"]:
      if ref["split"] != split:
        continue
      gt = records_lib.ground_truth_mask(record, ref)
      for sentence in ref["sentences"]:
        key = (int(ref["ref_id"]), int(sentence["sent_id"]))
        if key in seen:
          raise ScoringError(f"ground truth {where}: (ref_id={key[0]}, sent_id={key[1]}) occurs twice")
        seen.add(key)
        yield key, gt, bool(ref["ann_ids"]), ref["granularity"]


def score_split(records: Iterable[dict], split: str,
                predictions: Mapping[Key, tuple[int, predictions_lib.Prediction]], *, where: str,
                predictions_path: str = "predictions") -> SplitScore:
  """Scores one split's predictions; records missing and unknown keys (the caller decides if that is an error)."""
  metrics = metrics_lib.RESMetrics()
  coverage = Coverage(split)
  remaining = dict(predictions)
  invalid = None
  for key, gt, has_target, granularity in ground_truth_samples(records, split, where):
    coverage.samples += 1
    entry = remaining.pop(key, None)
    if entry is None:
      coverage.missing.append(key)
      pred = np.zeros_like(gt)
    else:
      number, prediction = entry
      if prediction.size != gt.shape:
        raise ScoringError(f"predictions {predictions_path} line {number}: field 'mask.size' is "
                           f"{list(prediction.size)}, the image of (ref_id={key[0]}, sent_id={key[1]}) is "
                           f"{list(gt.shape)}")
      pred = prediction.predicted_mask()
      if prediction.invalid is not None:
        invalid = (invalid or 0) + int(prediction.invalid)
    metrics.update(pred, gt, has_target, granularity)
  coverage.unknown = sorted(remaining)
  return SplitScore(split, metrics, coverage, invalid)


def default_records_fn(reader: str, data_dir: str, reader_options: Mapping[str, Any] | None = None
                       ) -> Callable[[str], Iterable[dict]]:
  """split → image records of that split, from the readers registry."""
  from unires_jax.data import datasets

  read = datasets.DATASETS.lookup(reader)
  # Empty values mean "the reader's default" (a locked ConfigDict cannot drop keys).
  options = {k: v for k, v in dict(reader_options or {}).items() if v not in ("", None)}
  return lambda split: read(data_dir, split, **options)


def predictions_made_with(predictions_path: str, allow_gt_boxes: bool, sentence_mode: str = "per_sentence"
                          ) -> provenance.MadeWith:
  """How a predictions file was made (its sidecar), checked against the box policy and the sentence mode."""
  provenance.check_sentence_mode(sentence_mode)
  made_with = provenance.read_sidecar(predictions_path)
  if made_with is None:
    return provenance.MadeWith.unknown(f"no {os.path.basename(provenance.sidecar_path(predictions_path))} beside "
                                       f"the predictions")
  provenance.check_made_with(made_with, allow_gt_boxes, f"predictions {predictions_path}")
  if made_with.sentence_mode != sentence_mode:
    raise ScoringError(f"predictions {predictions_path} were made with sentence_mode {made_with.sentence_mode!r}; "
                       f"scoring expects {sentence_mode!r}")
  return made_with


def score_predictions(predictions_path: str, *, dataset: str, splits: Sequence[str], evaluator: str,
                      records_fn: Callable[[str], Iterable[dict]], allow_missing: bool = False,
                      output_dir: str | None = None, allow_gt_boxes: bool = False,
                      sentence_mode: str = "per_sentence") -> dict:
  """Scores a predictions file on `splits`; returns the report written to metrics.json (and metrics.md) in
  `output_dir` (default: beside the predictions). Raises ScoringError on incomplete coverage unless
  `allow_missing`, and GroundTruthBoxesError for predictions made with ground-truth boxes unless `allow_gt_boxes`."""
  family = evaluators_lib.EVALUATORS.lookup(evaluator)
  made_with = predictions_made_with(predictions_path, allow_gt_boxes, sentence_mode)
  by_split, duplicates, other_splits = group_predictions(predictions_path, dataset, splits)
  if other_splits:
    log.warning("predictions %s: ignoring %d lines of splits not scored here: %s", predictions_path,
                sum(other_splits.values()), dict(other_splits))
  scores = []
  for split in splits:
    score = score_split(records_fn(split), split, by_split[split], where=f"{dataset} split {split}",
                        predictions_path=predictions_path)
    score.coverage.duplicate = duplicates[split]
    if score.coverage.samples == 0:
      raise ScoringError(f"ground truth of {dataset} split {split} has no samples; check data_dir and the split "
                         f"name")
    scores.append(score)
  problems = [line for score in scores for line in score.coverage.problems()]
  if problems and not allow_missing:
    raise ScoringError(f"predictions {predictions_path} do not cover the ground truth exactly; no score is "
                       f"computed on a subset (allow_missing=True scores missing samples as empty):\n  "
                       + "\n  ".join(problems))
  for line in problems:
    log.warning("%s", line)

  results = {score.split: family.summarize(score.metrics) for score in scores}
  split_reports = {score.split: {"metrics": results[score.split], "all_metrics": score.metrics.result(),
                                 "counts": score.metrics.sample_counts(), "coverage": score.coverage.to_json(),
                                 "invalid": score.invalid} for score in scores}
  invalid = {score.split: score.invalid for score in scores if score.invalid is not None}
  report, table = family.report(dataset, evaluator, made_with, results, split_reports, invalid or None,
                                predictions=os.path.abspath(predictions_path), allow_missing=allow_missing,
                                ignored_other_splits=dict(other_splits))
  output_dir = output_dir or os.path.dirname(os.path.abspath(predictions_path))
  evaluators_lib.write_report(output_dir, report, table)
  report["table"] = table
  return report


def score_from_config(config) -> dict:
  """Scores `config.predictions` as an eval config (configs/eval/*.py) describes."""
  if not config.predictions:
    raise ValueError("config.predictions is empty: expected the predictions.jsonl file to score")
  if not config.data_dir:
    raise ValueError("config.data_dir is empty: expected the folder holding the benchmark in its real layout")
  records_fn = default_records_fn(config.reader, config.data_dir, config.reader_options.to_dict())
  return score_predictions(config.predictions, dataset=config.dataset, splits=list(config.splits),
                           evaluator=config.type, records_fn=records_fn, allow_missing=config.allow_missing,
                           output_dir=config.output_dir or None,
                           allow_gt_boxes=bool(config.get("allow_gt_boxes", False)),
                           sentence_mode=config.get("sentence_mode", "per_sentence"))
