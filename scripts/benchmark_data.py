"""Input-pipeline throughput: samples/s of decode + preprocess + tokenize at full and toy resolution.

Builds its own synthetic records (640x480 JPEGs with object and part rectangles), then times the training
iterator with 0 and 2 worker processes for the 7b layout (336 + 1024 px) and the tiny one (56 + 128 px).

    python scripts/benchmark_data.py --out /tmp/benchmark_data.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from configs import common, data_common  # noqa: E402
from unires_jax import benchmark_io, cli  # noqa: E402
from unires_jax.data import pipeline, records  # noqa: E402

WORDS = ("red", "blue", "green", "left", "right", "box", "wheel", "handle", "top", "bottom", "large", "small")
RESOLUTIONS = {"full": "7b", "toy": "tiny"}


def synthetic_record(image_id: int, rng: np.random.Generator, height: int = 480, width: int = 640) -> dict:
  """A JPEG scene of coloured rectangles, each an object annotation with two part annotations inside it."""
  image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
  draw = ImageDraw.Draw(image)
  annotations = []
  for k in range(4):
    x0, y0 = int(rng.integers(0, width - 120)), int(rng.integers(0, height - 120))
    x1, y1 = x0 + int(rng.integers(60, 120)), y0 + int(rng.integers(60, 120))
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    boxes = [("object", (x0, y0, x1, y1)), ("part", (x0, y0, (x0 + x1) // 2, y1)), ("part", (x0, y0, x1, (y0 + y1) // 2))]
    for granularity, (bx0, by0, bx1, by1) in boxes:
      mask = np.zeros((height, width), np.uint8)
      mask[by0:by1, bx0:bx1] = 1
      rle = mask_utils.encode(np.asfortranarray(mask))
      annotations.append(dict(ann_id=len(annotations), category="box", granularity=granularity,
                              bbox=[float(bx0), float(by0), float(bx1), float(by1)],
                              rle=dict(size=[height, width], counts=rle["counts"].decode("ascii"))))
  encoded = io.BytesIO()
  image.save(encoded, format="JPEG", quality=90)
  refs = []
  for r, (ann_ids, granularity) in enumerate((([0], "object"), ([1], "part"), ([0, 3], "multi-object"), ([], "no-target"))):
    sentences = [dict(sent_id=image_id * 100 + r * 10 + s, sent="the " + " ".join(rng.choice(WORDS, 3))) for s in range(2)]
    refs.append(dict(ref_id=image_id * 10 + r, split="train", ann_ids=ann_ids, granularity=granularity,
                     sentences=sentences))
  return dict(dataset="synthetic", image_id=image_id, file_name=f"{image_id}.jpg", height=height, width=width,
              image_bytes=encoded.getvalue(), annotations=annotations, proposals=records.empty_proposals(),
              refs=refs)


def measure(split_dir: str, resolution: str, workers: int, batches: int, batch_size: int) -> dict:
  import ml_collections

  config = ml_collections.ConfigDict()
  config.model = common.model_config(RESOLUTIONS[resolution])
  config.data = data_common.data_config("toy" if resolution == "toy" else "full", [split_dir])
  config.data.batch_size = batch_size
  config.data.worker_count = workers
  config.data.toy_tokenizer_prefix = os.path.join(split_dir, "toy_tokenizer")
  pipeline.ensure_toy_tokenizer(config)
  iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  next(iterator)  # start-up (worker processes, file handles) is not timed
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  if workers:
    iterator.close()
  samples = batches * batch_size
  return dict(resolution=resolution, image_low=int(config.model.vit.image_size),
              image_high=int(config.model.convnext.image_size), workers=workers, samples=samples,
              seconds=round(seconds, 3), samples_per_s=round(samples / seconds, 2),
              samples_per_s_per_worker=round(samples / seconds / max(workers, 1), 2))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file for the figures")
  parser.add_argument("--images", type=int, default=32)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  results = []
  with tempfile.TemporaryDirectory() as root:
    split_dir = os.path.join(root, "split")
    records.write_split([synthetic_record(i, rng) for i in range(args.images)], split_dir, num_shards=2,
                        dataset="synthetic", split="train")
    for resolution in RESOLUTIONS:
      for workers in args.workers:
        results.append(measure(split_dir, resolution, workers, args.batches, args.batch_size))
        print(json.dumps(results[-1]), flush=True)
  report = dict(cpu_count=os.cpu_count(), images=args.images, image_hw=[480, 640], batch_size=args.batch_size,
                timed_batches=args.batches, results=results)
  benchmark_io.write_report(args.out, report)


if __name__ == "__main__":
  cli.run_main(main, "benchmark_data.py")
