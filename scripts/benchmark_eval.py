"""Throughput of offline scoring (no model): samples/s on the synthetic set with masks at a realistic resolution.

    python scripts/benchmark_eval.py --num-images 60 --image-size 480 640 --out /tmp/benchmark_eval.json

Three figures, each the best of `--repeats` runs: reading and validating predictions.jsonl, scoring with the ground
truth already in memory (RLE decode, I/U, accumulate), and the whole `score_predictions` (ground truth read through
the readers registry, PNG decode included). Predictions are the ground truth shifted by a few pixels, so I/U are
partial overlaps as from a real model.
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

from unires_jax.data import readers, records, synthetic  # noqa: E402
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


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-images", type=int, default=60)
  parser.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("HEIGHT", "WIDTH"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--work-dir", default="", help="where the synthetic set goes (default: a temporary folder)")
  parser.add_argument("--out", default="", help="also write the JSON result here")
  args = parser.parse_args(argv)

  work_dir = args.work_dir or tempfile.mkdtemp(prefix="benchmark_eval_")
  data_dir = synthetic.ensure_synthetic(os.path.join(work_dir, "synthetic"), num_images=args.num_images,
                                        image_size=tuple(args.image_size))
  ground_truth, predictions = [], []
  for split in SPLITS:
    for record in readers.DATASETS.lookup(READER)(data_dir, split):
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
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return result


if __name__ == "__main__":
  main()
