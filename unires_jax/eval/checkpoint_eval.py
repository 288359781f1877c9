"""Evaluating a checkpoint on a benchmark (`scripts/eval.py --config.checkpoint=DIR`): the benchmark's splits read
through their reader with the configured proposals attached, generation, the benchmark's evaluator, and a record of
how the numbers were made."""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections

from unires_jax import sharding
from unires_jax.data import pipeline
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.eval import answers, box_source, checkpoint_io, evaluators, inference, predict_fns, provenance
from unires_jax.models.unires import build_model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WrittenPredictions:
  """What `write_predictions` wrote: the predictions file, the folder the scores belong in, how it was made."""
  predictions: str
  output_dir: str
  made_with: provenance.MadeWith


def write_predictions(config: ml_collections.ConfigDict) -> WrittenPredictions:
  """Model-in-the-loop mode of `scripts/eval.py`: runs `config.checkpoint` over `config.splits` of the benchmark
  in `config.data_dir`; `config` is not changed.

  The model, tokenizer and data settings come from the checkpoint's run config; `config.batch_size` is the global
  eval batch; the boxes come from `config.proposals` (ground truth refused unless `config.allow_gt_boxes`), and the
  pipeline reads only those. Under `config.output_dir` (default `<workdir>/eval/step_<N>/<dataset>_<reader>`):
  `prepared/<split>/` (records with the attached proposals), `generation/predictions.jsonl` with its sidecar
  `generation/predictions.meta.json`, and the evaluator's `generation/metrics.json` (scores of the same masks on
  the prepared records).
  """
  if not config.checkpoint:
    raise ValueError("config.checkpoint is empty: expected a training workdir or checkpoints/<step> folder")
  if not config.data_dir:
    raise ValueError("config.data_dir is empty: expected the folder holding the benchmark in its real layout")
  if not os.path.isdir(config.data_dir):
    raise FileNotFoundError(f"config.data_dir {config.data_dir!r} does not exist")
  source = box_source.eval_source(config.proposals, bool(config.allow_gt_boxes), "eval config")
  loaded = checkpoint_io.load_checkpoint(config.checkpoint)
  made_with = box_source.made_with(source, config.sentence_mode, os.path.dirname(loaded.item_dir), loaded.step)
  output_dir = config.output_dir or os.path.join(loaded.workdir, "eval", f"step_{loaded.step}",
                                                 f"{config.dataset}_{config.reader}")

  run_config = box_source.eval_run_config(loaded.config, batch_size=int(config.batch_size))
  mesh = sharding.make_mesh(run_config.mesh)
  rules = sharding.rules_from_config(run_config.sharding_rules)
  sharding.check_batch_fits_mesh(int(config.batch_size), mesh, "config.batch_size")
  split_dirs = box_source.prepare_benchmark_splits(config, os.path.join(output_dir, "prepared"), source)

  model = build_model(run_config.model)
  params = inference.place_params(model, run_config.model, loaded.params, mesh, rules)
  predict_fn = predict_fns.make_predict_fn(model, run_config, mesh, rules)
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(run_config))
  splits = evaluators.make_eval_splits(run_config, split_dirs, batch_size=int(config.batch_size))
  generation_dir = os.path.join(output_dir, "generation")
  evaluator = evaluators.EVALUATORS.lookup(config.type)(
      predict_fn, splits, dataset=config.dataset, output_dir=generation_dir,
      allow_missing=bool(config.allow_missing), made_with=made_with,
      answer_parser=answers.AnswerParser.from_config(run_config, tokenizer))
  for name, value in evaluator.run(params):
    log.info("%s (step %s, boxes %s) %s: %.4f", config.dataset, loaded.step, made_with.box_source, name, value)
  return WrittenPredictions(os.path.join(generation_dir, "predictions.jsonl"), output_dir, made_with)
