"""Converts one split of a dataset layout into image records (ArrayRecord shards + sample table + index.json).

Shards are written in parallel (one process per shard) and atomically; a rerun skips shards already complete,
so an interrupted run resumes.

    python scripts/prepare_data.py --dataset refcoco --data-dir data/refcoco --image-dir data/coco/train2014 \
        --split val --out prepared/refcoco/val --num-shards 4 --workers 4

Records carry no proposals (source `none (no boxes)`) unless `--object-proposals F` / `--part-proposals F` name COCO
detection-results files (`{split}` in a path is replaced by the split); then each record stores those boxes with
their source (unires_jax/proposals/detections.py), and index.json counts unmatched ids and clipped boxes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import ml_collections  # noqa: E402
import tqdm  # noqa: E402

from configs import common  # noqa: E402
from unires_jax import proposals  # noqa: E402
from unires_jax.data import pipeline, readers, records  # noqa: E402
from unires_jax.data import datasets  # noqa: E402
from unires_jax.proposals import detections  # noqa: E402

MAX_LISTED_SKIPS = 20


def _reader_options(args) -> dict:
  options = {"skip_bad": args.skip_bad}
  if args.image_dir:
    options["image_dir"] = args.image_dir
  if args.split_by:
    options["split_by"] = args.split_by
  return options


def _proposal_config(args) -> dict | None:
  """The `proposals` config section the proposal flags describe; None when no detection file is given."""
  tuning = {"--proposal-score-threshold": args.proposal_score_threshold, "--proposal-top-k": args.proposal_top_k,
            "--proposal-match-by": args.proposal_match_by}
  if not (args.object_proposals or args.part_proposals):
    given = [flag for flag, value in tuning.items() if value is not None]
    if given:
      raise ValueError(f"{', '.join(given)} need --object-proposals or --part-proposals")
    return None
  defaults = common.proposals_config().detections
  options = dict(object_file=args.object_proposals or "", part_file=args.part_proposals or "",
                 score_threshold=defaults.score_threshold if args.proposal_score_threshold is None
                 else args.proposal_score_threshold,
                 top_k=defaults.top_k if args.proposal_top_k is None else args.proposal_top_k,
                 match_by=args.proposal_match_by or defaults.match_by)
  return common.proposals_config("detections", detections=options).to_dict()


def _proposal_summary(out_dir: str, num_shards: int, proposal_config: dict) -> dict:
  """The detections' counts over all shards (unmatched ids need every shard); each shard must hold these boxes."""
  source = proposals.build_source(ml_collections.ConfigDict(proposal_config))
  reports = []
  for k in range(num_shards):
    name = records.shard_name(k, num_shards)
    summary = records.read_shard_summary(os.path.join(out_dir, name))
    made_with = {r.get("proposal_source") for r in summary["records"]}
    if "proposal_report" not in summary or made_with - {source.describe()}:
      raise ValueError(f"{os.path.join(out_dir, name)} holds other proposals ({sorted(map(str, made_with))}), "
                       f"not {source.describe()}; delete it (or the split) and run again")
    reports.append(summary["proposal_report"])
  return source.summary(detections.merge_reports(reports))


def write_one_shard(dataset: str, data_dir: str, split: str, out_dir: str, shard_index: int, num_shards: int,
                    options: dict, proposal_config: dict | None = None) -> int:
  """Reads the images of shard `shard_index`, attaches their proposals (if configured) and writes them; returns
  the number of records."""
  bad = readers.BadEntries()
  reader = datasets.DATASETS.lookup(dataset)
  path = os.path.join(out_dir, records.shard_name(shard_index, num_shards))
  found = reader(data_dir, split, shard=(shard_index, num_shards), bad=bad, **options)
  report = None
  if proposal_config is not None:
    source = proposals.build_source(ml_collections.ConfigDict(proposal_config))
    found, report = proposals.attach(found, source, pipeline.decode_image), source.report
  # The live counts: the reader drops entries while write_shard consumes it.
  summary = records.write_shard(found, path, skipped=bad.counts, proposal_report=report,
                                skipped_entries=bad.messages)
  return len(summary["records"])


def prepare(dataset: str, data_dir: str, split: str, out_dir: str, *, num_shards: int = 1, workers: int = 1,
            options: dict | None = None, progress: bool = True, proposal_config: dict | None = None) -> dict:
  """Writes the missing shards, then the sample table and index; returns the index.

  `proposal_config` (a `proposals` config section as a dict, source `detections`) fills the records' proposals.
  """
  options = dict(options or {})
  reader = datasets.DATASETS.lookup(dataset)
  if num_shards < 1:
    raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
  if proposal_config is not None:
    proposals.build_source(ml_collections.ConfigDict(proposal_config))  # bad options fail before any shard
  os.makedirs(out_dir, exist_ok=True)
  pending = [k for k in range(num_shards)
             if records.read_shard_summary(os.path.join(out_dir, records.shard_name(k, num_shards))) is None]
  bar = tqdm.tqdm(total=num_shards, initial=num_shards - len(pending), desc=f"{dataset}/{split} shards",
                  disable=not progress)
  jobs = [(dataset, data_dir, split, out_dir, k, num_shards, options, proposal_config) for k in pending]
  if workers <= 1 or len(jobs) <= 1:
    for job in jobs:
      write_one_shard(*job)
      bar.update(1)
  else:
    # Spawned, not forked: a forked child of a process that has started threads (JAX, Grain) can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
      for future in concurrent.futures.as_completed([pool.submit(write_one_shard, *job) for job in jobs]):
        future.result()
        bar.update(1)
  bar.close()
  sources = [p for p in reader.source_files(data_dir, split, **options) if os.path.exists(p)]
  proposal_summary = None
  if proposal_config is not None:
    proposal_summary = _proposal_summary(out_dir, num_shards, proposal_config)
    sources += [path for kind in detections.KINDS for path in proposal_summary[kind]["files"]]
  return records.finalize_split(out_dir, num_shards, dataset=dataset, split=split, source_files=sources,
                                proposal_summary=proposal_summary)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(datasets.DATASETS.names())}")
  parser.add_argument("--data-dir", required=True, help="the dataset's folder (see data/README.md)")
  parser.add_argument("--split", required=True)
  parser.add_argument("--out", required=True, help="the prepared split's folder")
  parser.add_argument("--num-shards", type=int, default=1)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--skip-bad", action="store_true", help="drop and count malformed entries instead of failing")
  parser.add_argument("--image-dir", default=None, help="images folder (default: <data-dir>/images)")
  parser.add_argument("--split-by", default=None, help="refer/gRefCOCO split file: unc, umd or google")
  parser.add_argument("--object-proposals", default="", help="COCO detection-results JSON of object boxes")
  parser.add_argument("--part-proposals", default="", help="COCO detection-results JSON of part boxes")
  parser.add_argument("--proposal-score-threshold", type=float, default=None, help="keep scores >= this (0)")
  parser.add_argument("--proposal-top-k", type=int, default=None, help="best K boxes per image and kind (0 = all)")
  parser.add_argument("--proposal-match-by", choices=detections.MATCH_BY, default=None,
                      help="match detections to images by image_id (default) or file_name")
  args = parser.parse_args(argv)
  index = prepare(args.dataset, args.data_dir, args.split, args.out, num_shards=args.num_shards,
                  workers=args.workers, options=_reader_options(args), proposal_config=_proposal_config(args))
  print(f"{args.dataset}/{args.split}: {index['num_images']} images, {index['num_samples']} samples, "
        f"skipped {index['skipped_bad'] or 'none'}, proposals {index['proposals']['sources']} -> {args.out}")
  for entry in index["skipped_bad_entries"][:MAX_LISTED_SKIPS]:
    print(f"  skipped: {entry}")
  if len(index["skipped_bad_entries"]) > MAX_LISTED_SKIPS:
    print(f"  ... {len(index['skipped_bad_entries']) - MAX_LISTED_SKIPS} more in {args.out}/index.json "
          f"(skipped_bad_entries)")
  if "summary" in index["proposals"]:
    print("\n".join(detections.format_summary(index["proposals"]["summary"])))
  return index


if __name__ == "__main__":
  from unires_jax import cli
  cli.run_main(main, "prepare_data.py")
