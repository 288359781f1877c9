"""Runs a PyTorch export (`scripts/convert_to_pytorch.py` output) over a prepared split, without JAX.

    python scripts/predict_export.py --export /exports/toy --split-dir /runs/toy/eval/.../prepared/val \
        --out /tmp/torch_predictions.jsonl --box-source annotations

Writes predictions.jsonl (`unires_jax/eval/predictions.py`), one line per sentence in the split's order, scored by
`scripts/eval.py --config.predictions=...` like the JAX model's. Prompts, boxes and preprocessing are the eval
pipeline's (`data/prompts.py`; boxes of `--box-source` chosen as `granularity_boxes` does, at most the model's
slots, larger first); generation is `convert/torch_generate.py`. Nothing here imports JAX.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from unires_jax.data import prompts, records  # noqa: E402
from unires_jax.eval import predictions as predictions_lib  # noqa: E402

BOX_SOURCES = ("proposals", "annotations", "none")


def predict_split(predictor, split_dir: str, out_path: str, box_source: str = "proposals",
                  batch_size: int = 4, limit: int | None = None) -> int:
  """Writes the predictions of every sample of `split_dir` (or the first `limit`); returns how many."""
  if box_source not in BOX_SOURCES:
    raise ValueError(f"--box-source {box_source!r}: expected one of {BOX_SOURCES}")
  source = records.SplitSource(split_dir)
  count = len(source) if limit is None else min(limit, len(source))
  with predictions_lib.PredictionsWriter(out_path) as writer:
    for start in range(0, count, batch_size):
      samples = [source.sample(i) for i in range(start, min(start + batch_size, count))]
      images = [records.decode_image(s["record"]) for s in samples]
      boxes = [{kind: prompts.granularity_boxes(s["record"], s["ref"], kind, box_source)[0]
                for kind in ("object", "part")} for s in samples]
      results = predictor.predict_batch(images, [s["sentence"]["sent"] for s in samples], boxes)
      for sample, result in zip(samples, results):
        ids = sample["ids"]
        writer.write(predictions_lib.Prediction.from_mask(ids["dataset"], ids["split"], ids["ref_id"],
                                                          ids["sent_id"], result["mask"], result["no_target"]))
  return count


def main(argv=None) -> int:
  from unires_jax.convert.torch_model import UniRESTorch

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--export", required=True, help="a convert_to_pytorch.py output folder")
  parser.add_argument("--split-dir", required=True, help="a prepared split (records.write_split output)")
  parser.add_argument("--out", required=True, help="predictions.jsonl to write")
  parser.add_argument("--box-source", default="proposals", choices=BOX_SOURCES,
                      help="proposals: the boxes attached to the prepared records (default); annotations: ground truth")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--limit", type=int, help="only the first N samples")
  args = parser.parse_args(argv)
  try:
    predictor = UniRESTorch.from_exported(args.export).predictor()
    count = predict_split(predictor, args.split_dir, args.out, args.box_source, args.batch_size, args.limit)
  except (FileNotFoundError, KeyError, ValueError, records.RecordError) as e:
    print(f"predict_export: {e}", file=sys.stderr)
    raise SystemExit(2)
  print(f"wrote {count} predictions to {args.out}")
  return count


if __name__ == "__main__":
  main()
