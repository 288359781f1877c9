"""Benchmark evaluators: run a predict function over eval batches and score the masks at the original resolution.

One class per benchmark family, registered by name in `EVALUATORS` (big_vision style): `refcoco` (RefCOCO/+/g:
cIoU, mIoU, Pr@X), `grefcoco` (cIoU, gIoU, N-acc, T-acc), `refcocom` (Part mIoU, Obj&Part mIoU, cIoU) and
`synthetic` (all of them). `Evaluator(predict_fn, splits, dataset=...)`; `run(params)` yields
`(f"{split}/{metric}", value)` pairs and, given an output dir, writes predictions.jsonl (with its provenance
sidecar), metrics.json and metrics.md, each saying how the numbers were made (`provenance.MadeWith`). With an
`answer_parser` the generated answers are classified (`unires_jax.eval.answers`): invalid ones are scored as empty
masks and counted. The same family classes pick the reported metrics and tables for offline scoring
(`unires_jax.eval.scoring`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from unires_jax.data import records as records_lib
from unires_jax.data import refcocom as refcocom_lib
from unires_jax.data import transforms
from unires_jax.eval import answers as answers_lib
from unires_jax.eval import metrics as metrics_lib
from unires_jax.eval import predictions as predictions_lib
from unires_jax.eval import provenance
from unires_jax.registry import Registry

log = logging.getLogger(__name__)

EVALUATORS = Registry("evaluator")

# predict_fn(params, batch) → {"mask_logits": [B, S, S] on the S canvas, "has_seg": bool [B]} for this process's
# rows of the batch (numpy or fully addressable arrays).
PredictFn = Callable[[Any, Mapping[str, np.ndarray]], Mapping[str, Any]]

PRECISION_METRICS = tuple((f"Pr@0.{k}", f"Pr@0.{k}") for k in metrics_lib.PRECISION_TENTHS)


class SampleSource(Protocol):
  """What an evaluator needs of a split: `len()` samples and `sample(i)` → {record, ref, sentence, ids}
  (`unires_jax.data.records.SplitSource` is one)."""

  def __len__(self) -> int: ...

  def sample(self, sample_index: int) -> dict: ...


@dataclasses.dataclass
class EvalSplit:
  """One split to evaluate: its name, its samples, and a factory of this process's batches (each with
  `sample_index` [B], -1 on padding rows)."""
  name: str
  source: SampleSource
  batches: Callable[[], Iterable[Mapping[str, np.ndarray]]]


def make_eval_splits(config, split_dirs: Mapping[str, str], batch_size: int | None = None) -> list[EvalSplit]:
  """EvalSplits over prepared split directories, batched by the input pipeline with `config` (model + data)."""
  from unires_jax.data import pipeline

  splits = []
  for name, split_dir in split_dirs.items():
    source = records_lib.SplitSource(split_dir)
    batches = (lambda d=split_dir: pipeline.make_eval_iterator(config, d, batch_size=batch_size))
    splits.append(EvalSplit(name, source, batches))
  return splits


def _format_keys(keys: Sequence[tuple[int, int]], limit: int = 5) -> str:
  shown = ", ".join(f"(ref_id={r}, sent_id={s})" for r, s in keys[:limit])
  return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def markdown_table(results: Mapping[str, Mapping[str, float]], names: Sequence[str], title: str,
                   invalid: Mapping[str, int] | None = None, row_name: str = "split") -> str:
  """A Markdown table: one row per split, one column per metric name (values ×100, 2 decimals); with `invalid`,
  a last column of unparsable answers per split."""
  header = list(names) + (["invalid answers"] if invalid is not None else [])
  lines = [f"### {title}", "", f"| {row_name} | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
  for split, values in results.items():
    cells = [metrics_lib.format_value(values.get(name, math.nan)) for name in names]
    if invalid is not None:
      cells.append(str(invalid[split]) if split in invalid else "n/a")
    lines.append(f"| {split} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def clean_json(value):
  """NaN → None inside nested dicts, so metrics.json stays standard JSON."""
  if isinstance(value, dict):
    return {k: clean_json(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def write_report(output_dir: str, report: dict, table: str) -> None:
  """metrics.json (NaN written as null) and metrics.md under `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  for name, text in (("metrics.json", json.dumps(clean_json(report), indent=2, allow_nan=False) + "\n"),
                     ("metrics.md", table)):
    path = os.path.join(output_dir, name)
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "w") as f:
      f.write(text)
    os.replace(temp, path)


def _default_allgather(tree):
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree)


class Evaluator:
  """Scores a predict function on one benchmark family. Subclasses list the metrics they report as
  (reported name, key of `RESMetrics.result()`)."""

  METRICS: tuple[tuple[str, str], ...] = ()
  TITLE = "RES"

  def __init__(self, predict_fn: PredictFn, splits: Sequence[EvalSplit], *, dataset: str,
               output_dir: str | None = None, allow_missing: bool = False, process_index: int | None = None,
               process_count: int | None = None, allgather: Callable | None = None,
               made_with: provenance.MadeWith | None = None,
               answer_parser: answers_lib.AnswerParser | None = None):
    if not splits:
      raise ValueError(f"{type(self).__name__}: expected at least one split to evaluate")
    self.predict_fn = predict_fn
    self.splits = list(splits)
    self.dataset = dataset
    self.output_dir = output_dir
    self.allow_missing = allow_missing
    self.made_with = made_with or provenance.MadeWith.unknown("the evaluator was not told")
    self.answer_parser = answer_parser
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.allgather = allgather or _default_allgather
    self.results: dict[str, dict[str, float]] = {}

  # ---- what a family reports ----------------------------------------------------------------------------------

  @classmethod
  def metric_names(cls) -> list[str]:
    return [name for name, _ in cls.METRICS]

  @classmethod
  def summarize(cls, metrics: metrics_lib.RESMetrics) -> dict[str, float]:
    """The family's reported metrics (×100) from an accumulator; NaN where a metric has no samples."""
    result = metrics.result()
    return {name: result.get(key, math.nan) for name, key in cls.METRICS}

  @classmethod
  def paper_table(cls, results: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]] | None:
    """The benchmark's published table built from per-split results, when it differs from them (RefCOCOm)."""
    del results
    return None

  @classmethod
  def markdown(cls, results: Mapping[str, Mapping[str, float]], dataset: str,
               invalid: Mapping[str, int] | None = None) -> str:
    """metrics.md's tables (after the provenance header)."""
    return markdown_table(results, cls.metric_names(), f"{cls.TITLE}: {dataset}", invalid)

  @classmethod
  def report(cls, dataset: str, evaluator: str, made_with: provenance.MadeWith,
             results: Mapping[str, Mapping[str, float]], splits: Mapping[str, dict],
             invalid: Mapping[str, int] | None = None, **fields) -> tuple[dict, str]:
    """(metrics.json content, metrics.md text) of a scored benchmark; both say how it was made."""
    report = {"dataset": dataset, "evaluator": evaluator, "made_with": made_with.to_json(), **fields}
    table = cls.paper_table(results)
    if table is not None:
      report["paper_table"] = table
    report["splits"] = dict(splits)
    return report, made_with.markdown() + cls.markdown(results, dataset, invalid)

  # ---- the loop -----------------------------------------------------------------------------------------------

  def _predictions_path(self) -> str | None:
    if self.output_dir is None:
      return None
    if self.process_count == 1:
      return os.path.join(self.output_dir, "predictions.jsonl")
    return os.path.join(self.output_dir,
                        f"predictions.process-{self.process_index:05d}-of-{self.process_count:05d}.jsonl")

  def _answer_kinds(self, outputs: Mapping[str, Any], has_seg: np.ndarray, rows: Sequence[int],
                    phrases: Sequence[str]) -> dict[int, str]:
    """{row: answers.KINDS entry} for the given rows, when the evaluator parses answers; else {}."""
    if self.answer_parser is None:
      return {}
    if "tokens" not in outputs:
      raise ValueError("predict_fn returned no 'tokens': the evaluator's answer_parser needs the generated ids")
    tokens = np.asarray(outputs["tokens"])  # [B, T]
    kinds = self.answer_parser.kinds(tokens[list(rows)], has_seg[list(rows)], phrases)
    return dict(zip(rows, kinds))

  def _evaluate_split(self, params, split: EvalSplit, writer: predictions_lib.PredictionsWriter | None
                      ) -> tuple[metrics_lib.RESMetrics, dict, np.ndarray]:
    """This process's metrics, the split's coverage, and answer counts [len(answers.KINDS)] of this process."""
    metrics = metrics_lib.RESMetrics()
    seen = np.zeros((len(split.source),), np.uint32)  # [num_samples] how often each sample was scored here
    answer_counts = np.zeros((len(answers_lib.KINDS),), np.int64)  # [3] target, no-target, invalid
    cached_ref, cached_gt = None, None
    for batch in split.batches():
      sample_indices = np.asarray(batch["sample_index"]).reshape(-1)  # [B]
      if not (sample_indices >= 0).any():
        continue
      outputs = self.predict_fn(params, batch)
      mask_logits = np.asarray(outputs["mask_logits"], np.float32)  # [B, S, S]
      has_seg = np.asarray(outputs["has_seg"]).astype(bool).reshape(-1)  # [B]
      if mask_logits.shape[0] != sample_indices.shape[0] or has_seg.shape[0] != sample_indices.shape[0]:
        raise ValueError(f"split {split.name}: predict_fn returned mask_logits {mask_logits.shape} and has_seg "
                         f"{has_seg.shape} for a batch of {sample_indices.shape[0]} rows")
      rows = [row for row, sample_index in enumerate(sample_indices) if sample_index >= 0]
      samples = {row: split.source.sample(int(sample_indices[row])) for row in rows}
      kinds = self._answer_kinds(outputs, has_seg, rows, [samples[row]["sentence"]["sent"] for row in rows])
      for row in rows:
        sample_index, sample = sample_indices[row], samples[row]
        record, ref, ids = sample["record"], sample["ref"], sample["ids"]
        height, width = int(record["height"]), int(record["width"])
        if has_seg[row]:
          pred = transforms.mask_logits_to_original(mask_logits[row], height, width)  # [h, w]
        else:
          pred = np.zeros((height, width), bool)
        ref_key = (record["image_id"], ref["ref_id"])
        if ref_key != cached_ref:  # samples of one ref are adjacent in the sample table
          cached_ref, cached_gt = ref_key, records_lib.ground_truth_mask(record, ref)
        metrics.update(pred, cached_gt, has_target=bool(ref["ann_ids"]), granularity=ref["granularity"])
        seen[sample_index] += 1
        invalid = None
        if row in kinds:
          answer_counts[answers_lib.KINDS.index(kinds[row])] += 1
          invalid = kinds[row] == answers_lib.INVALID
        if writer is not None:
          writer.write(predictions_lib.Prediction.from_mask(
              self.dataset, split.name, ids["ref_id"], ids["sent_id"], pred, no_target=not has_seg[row],
              invalid=invalid))
    return metrics, self._check_coverage(split, seen, metrics, writer), answer_counts

  def _check_coverage(self, split: EvalSplit, seen: np.ndarray, metrics: metrics_lib.RESMetrics,
                      writer: predictions_lib.PredictionsWriter | None) -> dict:
    """Every sample scored exactly once over all processes; missing ones (e.g. skipped as too long) are an error
    unless `allow_missing`, which scores them as empty predictions."""
    if self.process_count > 1:
      seen = np.asarray(self.allgather(seen), np.uint32).sum(0)  # [num_samples]
    missing = np.flatnonzero(seen == 0)
    duplicate = np.flatnonzero(seen > 1)
    keys = lambda indices: [(split.source.sample(int(i))["ids"]["ref_id"],
                             split.source.sample(int(i))["ids"]["sent_id"]) for i in indices[:5]]
    if duplicate.size:
      raise ValueError(f"split {split.name}: {duplicate.size} samples were predicted more than once: "
                       f"{_format_keys(keys(duplicate))}")
    if missing.size:
      message = (f"split {split.name}: {missing.size} of {seen.size} samples were never predicted: "
                 f"{_format_keys(keys(missing))}")
      if not self.allow_missing:
        raise ValueError(message + " (allow_missing=True scores them as empty predictions)")
      log.warning("%s; scored as empty predictions", message)
      if self.process_index == 0:
        for i in missing:
          sample = split.source.sample(int(i))
          record, ref, ids = sample["record"], sample["ref"], sample["ids"]
          gt = records_lib.ground_truth_mask(record, ref)
          empty = np.zeros_like(gt)
          metrics.update(empty, gt, has_target=bool(ref["ann_ids"]), granularity=ref["granularity"])
          if writer is not None:
            writer.write(predictions_lib.Prediction.from_mask(self.dataset, split.name, ids["ref_id"],
                                                              ids["sent_id"], empty, no_target=True))
    return {"samples": int(seen.size), "missing": int(missing.size)}

  def run(self, params, *, output_dir: str | None = None,
          made_with: provenance.MadeWith | None = None) -> Iterator[tuple[str, float]]:
    """Yields `(f"{split}/{metric}", value)` per split; writes the output files after the last split. Given,
    `output_dir` and `made_with` replace the constructor's from this run on (the trainer's evaluator, built once,
    writes each step's results in their own folder)."""
    if output_dir is not None:
      self.output_dir = output_dir
    if made_with is not None:
      self.made_with = made_with
    path = self._predictions_path()
    writer = predictions_lib.PredictionsWriter(path) if path else None
    split_reports, invalid = {}, ({} if self.answer_parser is not None else None)
    self.results = {}
    try:
      for split in self.splits:
        local, coverage, answer_counts = self._evaluate_split(params, split, writer)
        metrics = metrics_lib.allreduce(local, allgather=self.allgather, process_count=self.process_count)
        if self.process_count > 1:
          answer_counts = np.asarray(self.allgather(answer_counts), np.int64).sum(0)  # [3]
        summary = self.summarize(metrics)
        self.results[split.name] = summary
        split_reports[split.name] = {"metrics": summary, "all_metrics": metrics.result(),
                                     "counts": metrics.sample_counts(), "coverage": coverage}
        if invalid is not None:
          split_reports[split.name]["answers"] = dict(zip(answers_lib.KINDS, (int(n) for n in answer_counts)))
          invalid[split.name] = int(answer_counts[answers_lib.KINDS.index(answers_lib.INVALID)])
        for name, value in summary.items():
          yield f"{split.name}/{name}", value
        if invalid is not None:
          yield f"{split.name}/invalid", float(invalid[split.name])
    except BaseException:
      if writer is not None:
        writer.abort()
      raise
    if writer is not None:
      writer.close()
    if self.output_dir is not None and self.process_count > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("unires_jax evaluator predictions written")  # every process
    if self.output_dir is not None and self.process_index == 0:
      if self.process_count > 1:
        self._merge_process_predictions()
      provenance.write_sidecar(os.path.join(self.output_dir, "predictions.jsonl"), self.made_with)
      report, table = self.report(self.dataset, type(self).__name__, self.made_with, self.results, split_reports,
                                  invalid)
      write_report(self.output_dir, report, table)

  def _merge_process_predictions(self) -> None:
    """Process 0 concatenates every process's predictions file into predictions.jsonl."""
    parts = [os.path.join(self.output_dir, f"predictions.process-{i:05d}-of-{self.process_count:05d}.jsonl")
             for i in range(self.process_count)]
    with predictions_lib.PredictionsWriter(os.path.join(self.output_dir, "predictions.jsonl")) as writer:
      for part in parts:
        for _, prediction in predictions_lib.iter_predictions(part):
          writer.write(prediction)
    for part in parts:
      os.remove(part)


@EVALUATORS.register("refcoco")
class RefCOCOEvaluator(Evaluator):
  """RefCOCO, RefCOCO+, RefCOCOg: cIoU, mIoU and Pr@X."""
  TITLE = "RefCOCO-family RES"
  METRICS = (("cIoU", "cIoU"), ("mIoU", "mIoU")) + PRECISION_METRICS


@EVALUATORS.register("grefcoco")
class GRefCOCOEvaluator(Evaluator):
  """gRefCOCO (generalized RES with multi- and no-target expressions): cIoU, gIoU, N-acc, T-acc."""
  TITLE = "gRefCOCO GRES"
  METRICS = (("cIoU", "cIoU"), ("gIoU", "gIoU"), ("N-acc", "N-acc"), ("T-acc", "T-acc"))


@EVALUATORS.register("refcocom")
class RefCOCOmEvaluator(Evaluator):
  """RefCOCOm (MRES): per split mIoU over part references, over all references, and cIoU; on the release's split
  files (`unires_jax.data.refcocom`) also the paper's table: Part = mIoU of `<split>_part_only`, Obj&Part = mIoU
  of `<split>_object_part`."""
  TITLE = "RefCOCOm MRES"
  METRICS = (("mIoU/part", "mIoU/part"), ("mIoU/obj&part", "mIoU"), ("cIoU", "cIoU"))
  COLUMNS = tuple(refcocom_lib.RELEASE_SETS.values())  # ('Part', 'Obj&Part')

  @classmethod
  def paper_table(cls, results):
    release = {name: refcocom_lib.parse_release_split(name) for name in results
               if name in refcocom_lib.RELEASE_SPLITS}
    if not release:
      return None
    table = {split: {column: math.nan for column in cls.COLUMNS} for split in refcocom_lib.BENCHMARK_SPLITS
             if any(benchmark == split for benchmark, _ in release.values())}
    for name, (split, column) in release.items():
      table[split][column] = results[name]["mIoU/obj&part"]  # the mIoU over every reference of the file
    return table

  @classmethod
  def markdown(cls, results, dataset, invalid=None):
    details = super().markdown(results, dataset, invalid)
    table = cls.paper_table(results)
    if table is None:
      return details
    paper = markdown_table(table, cls.COLUMNS, f"RefCOCOm mIoU as in the paper: {dataset}", row_name="split")
    note = ("Part: mIoU over `<split>_part_only`; Obj&Part: mIoU over `<split>_object_part` (the release's "
            "files).\n\n")
    return paper + "\n" + note + details


@EVALUATORS.register("synthetic")
class SyntheticEvaluator(Evaluator):
  """The synthetic set: every metric of the three families, plus mIoU per granularity."""
  TITLE = "Synthetic multi-granularity RES"
  METRICS = (("cIoU", "cIoU"), ("mIoU", "mIoU"), ("gIoU", "gIoU"), ("N-acc", "N-acc"), ("T-acc", "T-acc"),
             ("mIoU/part", "mIoU/part"), ("mIoU/obj&part", "mIoU"), ("mIoU/object", "mIoU/object"),
             ("mIoU/multi-object", "mIoU/multi-object")) + PRECISION_METRICS
