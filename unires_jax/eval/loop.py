"""Evaluation with the model in the loop: generation → masks → the registered evaluators; held-out loss; overlays.

Used by the trainer (periodic and final evaluation) and by `scripts/eval.py --config.checkpoint=DIR`. The
trainer's evaluators read their boxes from `config.eval.proposals` (`none` when unset), attached to copies of the
eval splits under `workdir/eval/proposals/`; ground-truth boxes need `config.eval.allow_gt_boxes` (box_source.py).
"""

from __future__ import annotations

import json
import logging
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from unires_jax.data import pipeline, records as records_lib, tokenizer as tokenizer_lib
from unires_jax.eval import answers as answers_lib, provenance
from unires_jax.eval import box_source, evaluators, metrics as metrics_lib, predictions as predictions_lib
from unires_jax.eval.predict_fns import make_predict_fn
from unires_jax.models import objective

log = logging.getLogger(__name__)


def held_out_loss(config, model, params, params_transform, mesh, rules, split_dir: str) -> dict[str, float]:
  """Mean loss parts over one prepared split (teacher forced)."""
  eval_step = objective.make_eval_step(model, dict(config.train.loss_weights), params_transform)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(eval_step)
  totals, batches = {}, 0
  for local_batch in pipeline.make_eval_iterator(config, split_dir):
    batch = pipeline.to_global_batch(local_batch, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      parts = jax.device_get(jitted(params, batch))
    for key, value in parts.items():
      totals[key] = totals.get(key, 0.0) + float(value)
    batches += 1
  return {key: value / max(batches, 1) for key, value in totals.items()}


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


def write_overlays(split_dir: str, predictions_path: str, out_dir: str, count: int = 6) -> list[str]:
  """PNGs of image | phrase | predicted mask (red) and ground truth (green outline) for the first samples."""
  os.makedirs(out_dir, exist_ok=True)
  source = records_lib.SplitSource(split_dir)
  by_key = {prediction.key: prediction for _, prediction in predictions_lib.iter_predictions(predictions_path)}
  written = []
  step = max(1, len(source) // count)
  for index in range(0, len(source), step):
    sample = source.sample(index)
    ids = sample["ids"]
    prediction = by_key.get((ids["ref_id"], ids["sent_id"]))
    if prediction is None:
      continue
    image = np.asarray(pipeline.decode_image(sample["record"]), np.float32)
    pred = prediction.predicted_mask()
    gt = records_lib.ground_truth_mask(sample["record"], sample["ref"])
    overlay = image.copy()
    overlay[pred] = 0.5 * overlay[pred] + 0.5 * np.array([255, 0, 0])
    edge = gt & ~(np.roll(gt, 1, 0) & np.roll(gt, -1, 0) & np.roll(gt, 1, 1) & np.roll(gt, -1, 1))
    overlay[edge] = [0, 255, 0]
    # Small images (the synthetic set) are enlarged so the overlay is readable.
    zoom = max(1, 384 // max(image.shape[:2]))
    height, width = image.shape[0] * zoom, image.shape[1] * zoom
    enlarge = lambda a: Image.fromarray(a.astype(np.uint8)).resize((width, height), Image.NEAREST)
    canvas = Image.new("RGB", (width * 2, height + 28), (255, 255, 255))
    canvas.paste(enlarge(image), (0, 28))
    canvas.paste(enlarge(overlay), (width, 28))
    answer = "no target" if prediction.no_target else "mask"
    ImageDraw.Draw(canvas).text((4, 8), f"{sample['sentence']['sent']}  -> {answer}", fill=(0, 0, 0))
    path = os.path.join(out_dir, f"overlay_{ids['ref_id']}_{ids['sent_id']}.png")
    canvas.save(path)
    written.append(path)
    if len(written) >= count:
      break
  return written


def trainer_eval_splits(config, workdir: str, step: int
                        ) -> tuple[dict[str, dict[str, str]], ml_collections.ConfigDict, provenance.MadeWith]:
  """({eval name: {split: prepared dir with the eval source's proposals}}, the run config the evaluators' pipeline
  uses (it reads those proposals only), and the provenance of the results); raises before any work when the
  source gives ground-truth boxes without `config.eval.allow_gt_boxes`."""
  proposals_config, allow_gt_boxes = box_source.trainer_proposals_config(config)
  source = box_source.eval_source(proposals_config, allow_gt_boxes, "config.eval.proposals")
  made_with = box_source.made_with(source, "per_sentence", os.path.join(os.path.abspath(workdir), "checkpoints",
                                                                        str(step)), step)
  split_dirs = {}
  for eval_name, eval_cfg in config.get("evals", {}).items():
    out_root = os.path.join(workdir, "eval", "proposals", eval_name.replace("/", "_"))
    split_dirs[eval_name] = box_source.attach_to_prepared(dict(eval_cfg.splits), source, proposals_config, out_root,
                                                          eval_cfg.dataset)
  return split_dirs, box_source.eval_run_config(config), made_with


def evaluate_during_training(config, model, params, params_transform, mesh, rules, workdir: str, step: int,
                             final: bool = False) -> dict[str, dict]:
  """Held-out loss on `config.eval_splits`; on the final call (or `eval.generate_every_time`) the evaluators of
  `config.evals` with generation on `config.eval.proposals` boxes, predictions files, baselines and overlays
  under `workdir/eval/step_N`."""
  results: dict[str, dict] = {}
  for name, split_dir in config.get("eval_splits", {}).items():
    results[f"heldout/{name}"] = held_out_loss(config, model, params, params_transform, mesh, rules, split_dir)
  if not (final or config.get("eval", {}).get("generate_every_time", False)) or not config.get("evals", {}):
    return results
  split_dirs, eval_config, made_with = trainer_eval_splits(config, workdir, step)
  if jax.process_index() == 0:
    log.info("evaluation at step %d: %s", step, made_with.markdown().strip())
  predict_fn = make_predict_fn(model, eval_config, mesh, rules, params_transform)
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(eval_config))
  answer_parser = answers_lib.AnswerParser.from_config(eval_config, tokenizer)
  for eval_name, eval_cfg in config.get("evals", {}).items():
    out_dir = os.path.join(workdir, "eval", f"step_{step}", eval_name.replace("/", "_"))
    splits = evaluators.make_eval_splits(eval_config, split_dirs[eval_name])
    evaluator = evaluators.EVALUATORS.lookup(eval_cfg.type)(predict_fn, splits, dataset=eval_cfg.dataset,
                                                            output_dir=out_dir, made_with=made_with,
                                                            answer_parser=answer_parser)
    values = dict(evaluator.run(params))
    results[f"eval/{eval_name}"] = values
    if final and jax.process_index() == 0:
      baselines = {name: trivial_baselines(split_dir) for name, split_dir in eval_cfg.splits.items()}
      with open(os.path.join(out_dir, "baselines.json"), "w") as f:
        json.dump(baselines, f, indent=2, default=float)
      first_split, first_dir = next(iter(eval_cfg.splits.items()))
      overlays = write_overlays(first_dir, os.path.join(out_dir, "predictions.jsonl"),
                                os.path.join(workdir, "overlays", eval_name.replace("/", "_")))
      results[f"baselines/{eval_name}"] = {f"{b}/{first_split}/{k}": v for b, m in baselines[first_split].items()
                                           for k, v in m.items() if k in ("cIoU", "mIoU", "gIoU")}
      results[f"overlays/{eval_name}"] = {"count": len(overlays), "dir": os.path.dirname(overlays[0]) if overlays else ""}
  return results
