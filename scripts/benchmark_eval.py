"""Throughput of evaluation: offline scoring (no model), and with the model in the loop (generation + metrics).

    python scripts/benchmark_eval.py --num-images 60 --image-size 480 640 --out /tmp/benchmark_eval.json
    python scripts/benchmark_eval.py --model-sizes tiny small --model-images 8 --out /tmp/benchmark_eval.json

Three figures, each the best of `--repeats` runs: reading and validating predictions.jsonl, scoring with the ground
truth already in memory (RLE decode, I/U, accumulate), and the whole `score_predictions` (ground truth read through
the readers registry, PNG decode included). Predictions are the ground truth shifted by a few pixels, so I/U are
partial overlaps as from a real model.

With `--model-sizes`, the model in the loop: the evaluator (`unires_jax.eval.evaluators`) runs greedy generation with
the KV cache and scores the masks on a prepared synthetic split, for the toy config's model (`tiny`) and for
`configs/unires_7b.py:<size>` (e.g. `small`, ≈100M parameters) with random parameters. Reported: the first pass
(compilation included) and the samples/s of a second, compiled pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402

import itertools  # noqa: E402

from unires_jax import benchmark_io, cli  # noqa: E402
from unires_jax.data import records, synthetic  # noqa: E402
from unires_jax.data import datasets  # noqa: E402
from unires_jax.eval import metrics as metrics_lib  # noqa: E402
from unires_jax.eval import predictions as predictions_lib  # noqa: E402
from unires_jax.eval import scoring  # noqa: E402

READER = "synthetic_grefcoco"
SPLITS = ("val", "testA", "testB")


def _shifted(mask: np.ndarray, pixels: int) -> np.ndarray:
  out = np.zeros_like(mask)
  out[:, pixels:] = mask[:, :-pixels]  # [h, w] moved right
  return out


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _random_params(model, model_cfg, seed: int = 0):
  """Random params of the model's shapes (norm scales near 1), without compiling its init."""
  import flax.linen as nn
  import jax

  from unires_jax.train import state as state_lib

  example = {k: np.zeros(v.shape, v.dtype) for k, v in state_lib.abstract_batch(model_cfg, 1).items()}
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), example)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    values = rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      values += 1.0
    return values.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def model_in_the_loop(size: str, data_dir: str, work_dir: str, num_images: int, batch_size: int) -> dict:
  """Samples/s of the evaluator with generation on `num_images` synthetic val images, model `size`."""
  import jax

  import configs.toy as toy_config
  import configs.unires_7b as full_config
  from unires_jax import sharding
  from unires_jax.data import pipeline, prompts
  from unires_jax.eval import evaluators, inference, predict_fns
  from unires_jax.train import state as state_lib

  split_dir = os.path.join(work_dir, f"prepared_{num_images}", "val")
  if not os.path.exists(os.path.join(split_dir, records.INDEX)):
    records.write_split(itertools.islice(datasets.DATASETS.lookup(READER)(data_dir, "val"), num_images), split_dir,
                        num_shards=1, dataset="synthetic", split="val")
  config = toy_config.get_config("quick")
  if size != "tiny":
    config.model = full_config.get_config(size).model
    config.data.max_text_len = pipeline_prefix_len(config) + 64
  config.data.sources = [dict(dir=split_dir, weight=1.0)]
  config.data.toy_tokenizer_prefix = os.path.join(work_dir, "toy_tokenizer")
  pipeline.ensure_toy_tokenizer(config)
  config.data.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  model = state_lib.build_model(config.model)
  params = inference.place_params(model, config.model, _random_params(model, config.model), mesh, rules)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  predict_fn = predict_fns.make_predict_fn(model, config, mesh, rules)
  splits = evaluators.make_eval_splits(config, {"val": split_dir}, batch_size=batch_size)
  evaluator = evaluators.SyntheticEvaluator(predict_fn, splits, dataset="synthetic")
  samples = len(splits[0].source)
  start = time.perf_counter()
  dict(evaluator.run(params))
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  dict(evaluator.run(params))
  steady_s = time.perf_counter() - start
  return {"model": size, "parameters": num_params, "dtype": config.model.dtype, "samples": samples,
          "batch_size": batch_size, "max_new_tokens": prompts.max_new_tokens(config),
          "seq_len": int(config.data.max_text_len), "first_pass_s_with_compile": round(first_s, 2),
          "samples_per_s": round(samples / steady_s, 2), "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}


def pipeline_prefix_len(config) -> int:
  """Visual prefix tokens of the prompt (docs/DESIGN.md): `<s>`, then each group of slots with its two markers."""
  vit, flow = config.model.vit, config.model.vision_flow
  return 1 + ((vit.image_size // vit.patch_size) ** 2 + 2) + (flow.max_object_boxes + 2) + (flow.max_part_boxes + 2)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-images", type=int, default=60)
  parser.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("HEIGHT", "WIDTH"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--work-dir", default="", help="where the synthetic set goes (default: a temporary folder)")
  parser.add_argument("--out", default="", help="also write the JSON result here")
  parser.add_argument("--model-sizes", nargs="*", default=[], help="also time evaluation with the model in the "
                      "loop for these sizes: tiny (configs/toy.py) and/or small / 1b (configs/unires_7b.py:<size>)")
  parser.add_argument("--model-images", type=int, default=8, help="synthetic val images for the model-in-the-loop run")
  parser.add_argument("--model-batch-size", type=int, default=8)
  parser.add_argument("--skip-offline", action="store_true", help="only the model-in-the-loop figures")
  args = parser.parse_args(argv)

  work_dir = args.work_dir or tempfile.mkdtemp(prefix="benchmark_eval_")
  data_dir = synthetic.ensure_synthetic(os.path.join(work_dir, "synthetic"), num_images=args.num_images,
                                        image_size=tuple(args.image_size))
  result = {} if args.skip_offline else offline_scoring(args, data_dir, work_dir)
  if args.model_sizes:
    result["model_in_the_loop"] = [model_in_the_loop(size, data_dir, work_dir, args.model_images,
                                                     args.model_batch_size) for size in args.model_sizes]
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    benchmark_io.write_report(args.out, result)
  return result


def offline_scoring(args, data_dir: str, work_dir: str) -> dict:
  """Reading, in-memory scoring and whole `score_predictions` of shifted ground-truth predictions."""
  ground_truth, predictions = [], []
  for split in SPLITS:
    for record in datasets.DATASETS.lookup(READER)(data_dir, split):
      for ref in record["refs"]:
        gt = records.ground_truth_mask(record, ref)
        for sentence in ref["sentences"]:
          pred = _shifted(gt, 4)
          predictions.append(predictions_lib.Prediction.from_mask("synthetic", split, ref["ref_id"],
                                                                  sentence["sent_id"], pred))
          ground_truth.append((gt, bool(ref["ann_ids"]), ref["granularity"]))
  path = os.path.join(work_dir, "predictions.jsonl")
  predictions_lib.write_predictions(path, predictions)
  num_samples = len(predictions)

  read_s = _best(lambda: predictions_lib.read_predictions(path), args.repeats)
  loaded = predictions_lib.read_predictions(path)

  def score_in_memory():
    metrics = metrics_lib.RESMetrics()
    for prediction, (gt, has_target, granularity) in zip(loaded, ground_truth):
      metrics.update(prediction.predicted_mask(), gt, has_target, granularity)
    return metrics

  core_s = _best(score_in_memory, args.repeats)
  records_fn = scoring.default_records_fn(READER, data_dir)
  full_s = _best(lambda: scoring.score_predictions(path, dataset="synthetic", splits=list(SPLITS),
                                                   evaluator="synthetic", records_fn=records_fn,
                                                   output_dir=os.path.join(work_dir, "report")), args.repeats)
  result = {
      "what": "offline scoring of predictions.jsonl (no model)",
      "samples": num_samples,
      "image_size": list(args.image_size),
      "read_predictions_samples_per_s": round(num_samples / read_s, 1),
      "score_in_memory_samples_per_s": round(num_samples / core_s, 1),
      "score_predictions_samples_per_s": round(num_samples / full_s, 1),
      "seconds": {"read_predictions": round(read_s, 4), "score_in_memory": round(core_s, 4),
                  "score_predictions": round(full_s, 4)},
      "cIoU_of_shifted_ground_truth": round(score_in_memory().result()["cIoU"], 3),
  }
  return result


if __name__ == "__main__":
  cli.run_main(main, "benchmark_eval.py")
