"""Prepared-split formats compared: the project's msgpack ArrayRecord split vs a TFDS ArrayRecord dataset.

Both hold the same synthetic records (benchmark_data.synthetic_record: 640x480 JPEGs, 12 annotations with RLE masks,
4 refs of 2 sentences). Times the write of each, then random-access reads of whole records, as the Grain pipeline
does them: `records.SplitSource.record(i)` against `tfds.data_source` item i turned back into the record dict
(and, for reference, the TFDS item alone). The TFDS builder here is the faithful mapping a TFDS split would need:
flat features, a Sequence of annotations, refs as JSON text (TFDS cannot nest sentences inside refs without
TensorFlow).

    python scripts/benchmark_tfds.py --out docs/benchmarks/tfds.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmark_data  # noqa: E402
from unires_jax import benchmark_io, cli  # noqa: E402
from unires_jax.data import records  # noqa: E402


def _tfds_builder_class(records_list: list[dict]):
  import tensorflow_datasets as tfds

  f = tfds.features

  class SyntheticRecords(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=f.FeaturesDict({
          "dataset": f.Text(), "image_id": f.Scalar(np.int64), "file_name": f.Text(),
          "height": f.Scalar(np.int64), "width": f.Scalar(np.int64),
          "image_bytes": f.Tensor(shape=(), dtype=np.object_),
          "annotations": f.Sequence({"ann_id": np.int64, "category": f.Text(), "granularity": f.Text(),
                                     "bbox": f.Tensor(shape=(4,), dtype=np.float64), "rle_counts": f.Text()}),
          "proposals": {"object": f.Tensor(shape=(None, 4), dtype=np.float64),
                        "part": f.Tensor(shape=(None, 4), dtype=np.float64),
                        "object_scores": f.Tensor(shape=(None,), dtype=np.float64),
                        "part_scores": f.Tensor(shape=(None,), dtype=np.float64), "source": f.Text()},
          "refs_json": f.Text(),
      }))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for j, record in enumerate(records_list):
        props = record["proposals"]
        yield j, {**{k: record[k] for k in ("dataset", "image_id", "file_name", "height", "width", "image_bytes")},
                  "annotations": [{"ann_id": a["ann_id"], "category": a["category"], "granularity": a["granularity"],
                                   "bbox": a["bbox"], "rle_counts": a["rle"]["counts"]}
                                  for a in record["annotations"]],
                  "proposals": {"object": np.asarray(props["object"], np.float64).reshape(-1, 4),
                                "part": np.asarray(props["part"], np.float64).reshape(-1, 4),
                                "object_scores": np.asarray(props["object_scores"], np.float64),
                                "part_scores": np.asarray(props["part_scores"], np.float64),
                                "source": props["source"]},
                  "refs_json": json.dumps(record["refs"])}

  return SyntheticRecords


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def record_from_tfds(item: dict) -> dict:
  """The record dict (records.validate_record's schema) from a decoded TFDS item."""
  height, width = int(item["height"]), int(item["width"])
  anns = item["annotations"]
  annotations = [{"ann_id": int(i), "category": _text(c), "granularity": _text(g), "bbox": list(map(float, b)),
                  "rle": {"size": [height, width], "counts": _text(r)}}
                 for i, c, g, b, r in zip(anns["ann_id"], anns["category"], anns["granularity"], anns["bbox"],
                                          anns["rle_counts"])]
  props = item["proposals"]
  proposals = {"object": props["object"].tolist(), "part": props["part"].tolist(),
               "object_scores": props["object_scores"].tolist(), "part_scores": props["part_scores"].tolist(),
               "source": _text(props["source"])}
  record = {"dataset": _text(item["dataset"]), "image_id": int(item["image_id"]),
            "file_name": _text(item["file_name"]),
            "height": height, "width": width, "image_bytes": bytes(item["image_bytes"]), "annotations": annotations,
            "proposals": proposals, "refs": json.loads(_text(item["refs_json"]))}
  records.validate_record(record, f"tfds/{record['image_id']}")
  return record


def _rate(read, order, rounds: int = 3) -> float:
  """Reads per second over `order`, the best of `rounds` (the machine is shared)."""
  read(int(order[0]))  # open files before timing
  best = 0.0
  for _ in range(rounds):
    start = time.perf_counter()
    for i in order:
      read(int(i))
    best = max(best, len(order) / (time.perf_counter() - start))
  return best


def _tfds_sample(source, table: np.ndarray, sample_index: int) -> dict:
  """What `SplitSource.sample` returns, read through the TFDS source."""
  record_index, ref_index, sentence_index = (int(v) for v in table[sample_index])
  record = record_from_tfds(source[record_index])
  ref = record["refs"][ref_index]
  return {"record": record, "ref": ref, "sentence": ref["sentences"][sentence_index]}


def _pipeline_estimate(figures_path: str, extra_s_per_sample: float) -> list[dict]:
  """The pipeline's samples/s (benchmark_data.py figures, 0 workers) with the extra read time per sample added."""
  if not os.path.exists(figures_path):
    return []
  with open(figures_path) as f:
    results = json.load(f)["results"]
  estimate = []
  for r in results:
    if r["workers"] == 0:
      tfds_rate = 1.0 / (1.0 / r["samples_per_s"] + extra_s_per_sample)
      estimate.append({"resolution": r["resolution"], "own_samples_per_s": r["samples_per_s"],
                       "tfds_samples_per_s": round(tfds_rate, 2),
                       "slowdown": round(r["samples_per_s"] / tfds_rate, 3)})
  return estimate


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file for the figures")
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--reads", type=int, default=2000)
  parser.add_argument("--pipeline-figures", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                                  "benchmarks", "data.json"),
                      help="benchmark_data.py's JSON, to estimate the whole pipeline's slowdown")
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)
  made = [benchmark_data.synthetic_record(i, rng) for i in range(args.images)]
  order = np.random.default_rng(1).integers(0, args.images, args.reads)
  with tempfile.TemporaryDirectory() as root:
    start = time.perf_counter()
    records.write_split(made, os.path.join(root, "own"), num_shards=1, dataset="synthetic", split="train")
    own_write = time.perf_counter() - start
    start = time.perf_counter()
    builder = _tfds_builder_class(made)(data_dir=os.path.join(root, "tfds"), file_format="array_record")
    builder.download_and_prepare()
    tfds_write = time.perf_counter() - start

    own = records.SplitSource(os.path.join(root, "own"))
    source = tfds.data_source("synthetic_records", split="train", data_dir=os.path.join(root, "tfds"))
    faithful = all(record_from_tfds(source[j]) == own.record(j) == made[j] for j in range(args.images))
    own_rate = _rate(own.record, order)
    tfds_rate = _rate(lambda i: record_from_tfds(source[i]), order)
    tfds_item_rate = _rate(source.__getitem__, order)
    sample_order = np.random.default_rng(2).integers(0, len(own), args.reads)
    own_sample_rate = _rate(own.sample, sample_order)
    tfds_sample_rate = _rate(lambda i: _tfds_sample(source, own.sample_table, i), sample_order)
    sizes = {f"{name}_bytes": sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(os.path.join(root, name))
                                  for n in ns) for name in ("own", "tfds")}
  report = dict(cpu_count=os.cpu_count(), images=args.images, random_reads=args.reads, faithful_round_trip=faithful,
                write_s={"own": round(own_write, 3), "tfds": round(tfds_write, 3)},
                records_per_s={"own_split_source": round(own_rate, 1),
                               "tfds_data_source_as_record": round(tfds_rate, 1),
                               "tfds_data_source_item_only": round(tfds_item_rate, 1)},
                samples_per_s={"own_split_source": round(own_sample_rate, 1),
                               "tfds_data_source": round(tfds_sample_rate, 1)},
                read_slowdown=round(own_sample_rate / tfds_sample_rate, 2),
                pipeline_estimate=_pipeline_estimate(args.pipeline_figures,
                                                     1.0 / tfds_sample_rate - 1.0 / own_sample_rate), **sizes)
  print(json.dumps(report, indent=2))
  benchmark_io.write_report(args.out, report)


if __name__ == "__main__":
  cli.run_main(main, "benchmark_tfds.py")
