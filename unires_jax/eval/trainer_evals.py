"""The trainer's evaluations, built once before the first step from `config.evals[name]` (the eval config schema of
configs/eval/base.py, the one `scripts/eval.py` reads).

Each entry's splits are read from `data_dir` through its reader with its proposals attached (ground truth refused
unless `allow_gt_boxes`; `box_source.py`), once, under `workdir/eval/prepared/<name>/`. One predict function and one
held-out loss, each jitted once, serve every entry; each entry has its own evaluator. At every evaluation
(`train.eval_every` and the end) an entry with `heldout_loss` reports its splits' teacher-forced loss; at the final
one (every one with `generate_every_eval`) its evaluator generates and scores under `workdir/eval/step_<N>/<name>/`,
and the final one also writes trivial baselines and overlays. `unires_jax/run.py` hands `build` to the loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import jax
import ml_collections

from unires_jax import proposals as proposals_lib
from unires_jax import sharding
from unires_jax.data import datasets, pipeline, tokenizer as tokenizer_lib
from unires_jax.eval import answers as answers_lib, baselines as baselines_lib, box_source, evaluators
from unires_jax.eval import heldout as heldout_lib, overlays as overlays_lib, provenance
from unires_jax.eval.predict_fns import make_predict_fn

log = logging.getLogger(__name__)

# Keys of the trainer's earlier eval schema, and what took their place.
REPLACED_KEYS = {"eval_splits": "config.evals[name].heldout_loss=True",
                 "eval": "config.evals[name] (proposals, allow_gt_boxes, generate_every_eval) and "
                         "config.generation.max_new_tokens"}
# Eval config keys that only scripts/eval.py reads: the trainer evaluates its own params and writes its own reports.
SCRIPT_ONLY_KEYS = ("checkpoint", "predictions", "output_dir")

# evaluate(params, step, final) → {prefix: {metric: value}}
Evaluate = Callable[..., dict]


def folder_name(eval_name: str) -> str:
  return eval_name.replace("/", "_")


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses an evaluation that cannot run, before anything is built or trained: replaced keys, an unknown
  evaluator or reader, a missing data_dir, a script-only key, ground-truth boxes without `allow_gt_boxes`."""
  for key, replacement in REPLACED_KEYS.items():
    if key in config:
      raise KeyError(f"config.{key} is no longer read: use {replacement} (configs/eval/base.py)")
  for name, entry in config.get("evals", {}).items():
    where = f"config.evals[{name!r}]"
    evaluators.EVALUATORS.lookup(entry.type)
    datasets.DATASETS.lookup(entry.reader)
    for key in SCRIPT_ONLY_KEYS:
      if entry.get(key, ""):
        raise ValueError(f"{where}.{key} is {entry[key]!r}: the trainer evaluates its own params and writes under "
                         f"workdir/eval/; leave it empty (it is for scripts/eval.py)")
    if not entry.splits:
      raise ValueError(f"{where}.splits is empty: expected the split names to evaluate")
    if not os.path.isdir(entry.data_dir):
      raise FileNotFoundError(f"{where}.data_dir {entry.data_dir!r} does not exist (expected the benchmark in its "
                              f"real layout, read by reader {entry.reader!r})")
    provenance.check_sentence_mode(entry.sentence_mode)
    box_source.check_policy(entry.proposals, bool(entry.allow_gt_boxes), f"{where}.proposals")


@dataclasses.dataclass
class _Evaluation:
  name: str
  entry: ml_collections.ConfigDict
  source: proposals_lib.ProposalSource
  split_dirs: dict[str, str]
  evaluator: evaluators.Evaluator


def build(config: ml_collections.ConfigDict, model, params_transform: Callable, mesh, rules,
          workdir: str) -> Evaluate | None:
  """`evaluate(params, step, final)` over every `config.evals` entry, or None when there is none."""
  check(config)
  if not config.get("evals", {}):
    return None
  run_config = box_source.eval_run_config(config)  # the pipeline reads the attached proposals and nothing else
  predict_fn = make_predict_fn(model, run_config, mesh, rules, params_transform)
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(run_config))
  answer_parser = answers_lib.AnswerParser.from_config(run_config, tokenizer)
  heldout_loss = None
  if any(entry.heldout_loss for entry in config.evals.values()):
    heldout_loss = heldout_lib.make_heldout_loss(run_config, model, params_transform, mesh, rules)
  evaluations = []
  for name, entry in config.evals.items():
    where = f"config.evals[{name!r}]"
    sharding.check_batch_fits_mesh(int(entry.batch_size), mesh, f"{where}.batch_size")
    source = box_source.eval_source(entry.proposals, bool(entry.allow_gt_boxes), f"{where}.proposals")
    split_dirs = box_source.prepare_benchmark_splits(
        entry, os.path.join(workdir, "eval", "prepared", folder_name(name)), source)
    splits = evaluators.make_eval_splits(run_config, split_dirs, batch_size=int(entry.batch_size))
    evaluator = evaluators.EVALUATORS.lookup(entry.type)(predict_fn, splits, dataset=entry.dataset,
                                                         allow_missing=bool(entry.allow_missing),
                                                         answer_parser=answer_parser)
    evaluations.append(_Evaluation(name, entry, source, split_dirs, evaluator))

  def evaluate(params, step: int, final: bool = False) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for evaluation in evaluations:
      if evaluation.entry.heldout_loss:
        for split, split_dir in evaluation.split_dirs.items():
          results[f"heldout/{evaluation.name}/{split}"] = heldout_loss(params, split_dir,
                                                                       int(evaluation.entry.batch_size))
    for evaluation in evaluations:
      if final or evaluation.entry.generate_every_eval:
        results.update(_generate_and_score(evaluation, params, workdir, step, final))
    return results

  return evaluate


def _generate_and_score(evaluation: _Evaluation, params, workdir: str, step: int, final: bool) -> dict[str, dict]:
  name, entry = evaluation.name, evaluation.entry
  checkpoint = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  made_with = box_source.made_with(evaluation.source, entry.sentence_mode, checkpoint, step)
  if jax.process_index() == 0:
    log.info("evaluation %s at step %d: %s", name, step, made_with.markdown().strip())
  out_dir = os.path.join(workdir, "eval", f"step_{step}", folder_name(name))
  results = {f"eval/{name}": dict(evaluation.evaluator.run(params, output_dir=out_dir, made_with=made_with))}
  if final and jax.process_index() == 0:
    baselines = {split: baselines_lib.trivial_baselines(split_dir)
                 for split, split_dir in evaluation.split_dirs.items()}
    with open(os.path.join(out_dir, "baselines.json"), "w") as f:
      json.dump(baselines, f, indent=2, default=float)
    first_split, first_dir = next(iter(evaluation.split_dirs.items()))
    written = overlays_lib.write_overlays(first_dir, os.path.join(out_dir, "predictions.jsonl"),
                                          os.path.join(workdir, "overlays", folder_name(name)))
    results[f"baselines/{name}"] = {f"{b}/{first_split}/{k}": v for b, m in baselines[first_split].items()
                                    for k, v in m.items() if k in ("cIoU", "mIoU", "gIoU")}
    results[f"overlays/{name}"] = {"count": len(written), "dir": os.path.dirname(written[0]) if written else ""}
  return results
