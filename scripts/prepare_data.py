"""Converts one split of a dataset layout into image records (ArrayRecord shards + sample table + index.json).

Shards are written in parallel (one process per shard) and atomically; a rerun skips shards already complete,
so an interrupted run resumes.

    python scripts/prepare_data.py --dataset refcoco --data-dir data/refcoco --image-dir data/coco/train2014 \
        --split val --out prepared/refcoco/val --num-shards 4 --workers 4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
from typing import Sequence

import tqdm

from unires_jax.data import readers, records


def _reader_options(args) -> dict:
  options = {"skip_bad": args.skip_bad}
  if args.image_dir:
    options["image_dir"] = args.image_dir
  if args.split_by:
    options["split_by"] = args.split_by
  return options


def write_one_shard(dataset: str, data_dir: str, split: str, out_dir: str, shard_index: int, num_shards: int,
                    options: dict) -> int:
  """Reads the images of shard `shard_index` and writes them; returns the number of records."""
  bad = readers.BadEntries()
  reader = readers.DATASETS.lookup(dataset)
  path = os.path.join(out_dir, records.shard_name(shard_index, num_shards))
  found = reader(data_dir, split, shard=(shard_index, num_shards), bad=bad, **options)
  summary = records.write_shard(found, path, skipped=dict(bad.counts))
  return len(summary["records"])


def prepare(dataset: str, data_dir: str, split: str, out_dir: str, *, num_shards: int = 1, workers: int = 1,
            options: dict | None = None, progress: bool = True) -> dict:
  """Writes the missing shards, then the sample table and index; returns the index."""
  options = dict(options or {})
  reader = readers.DATASETS.lookup(dataset)
  if num_shards < 1:
    raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
  os.makedirs(out_dir, exist_ok=True)
  pending = [k for k in range(num_shards)
             if records.read_shard_summary(os.path.join(out_dir, records.shard_name(k, num_shards))) is None]
  bar = tqdm.tqdm(total=num_shards, initial=num_shards - len(pending), desc=f"{dataset}/{split} shards",
                  disable=not progress)
  jobs = [(dataset, data_dir, split, out_dir, k, num_shards, options) for k in pending]
  if workers <= 1 or len(jobs) <= 1:
    for job in jobs:
      write_one_shard(*job)
      bar.update(1)
  else:
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
      for future in concurrent.futures.as_completed([pool.submit(write_one_shard, *job) for job in jobs]):
        future.result()
        bar.update(1)
  bar.close()
  sources = [p for p in reader.source_files(data_dir, split, **options) if os.path.exists(p)]
  return records.finalize_split(out_dir, num_shards, dataset=dataset, split=split, source_files=sources)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(readers.DATASETS.names())}")
  parser.add_argument("--data-dir", required=True, help="the dataset's folder (see data/README.md)")
  parser.add_argument("--split", required=True)
  parser.add_argument("--out", required=True, help="the prepared split's folder")
  parser.add_argument("--num-shards", type=int, default=1)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--skip-bad", action="store_true", help="drop and count malformed entries instead of failing")
  parser.add_argument("--image-dir", default=None, help="images folder (default: <data-dir>/images)")
  parser.add_argument("--split-by", default=None, help="refer/gRefCOCO split file: unc, umd or google")
  args = parser.parse_args(argv)
  index = prepare(args.dataset, args.data_dir, args.split, args.out, num_shards=args.num_shards,
                  workers=args.workers, options=_reader_options(args))
  print(f"{args.dataset}/{args.split}: {index['num_images']} images, {index['num_samples']} samples, "
        f"skipped {index['skipped_bad'] or 'none'} -> {args.out}")
  return index


if __name__ == "__main__":
  main()
