"""prepare_data: index counts against the source files, resuming without rewriting, skip-bad counts."""

from __future__ import annotations

import collections
import json
import os

import pytest

from scripts import prepare_data
from unires_jax.data import records, synthetic


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("synthetic")), num_images=7, seed=2)


def _expected(synthetic_dir, split):
  grefs = [r for r in json.load(open(os.path.join(synthetic_dir, "grefcoco", "grefs(unc).json")))
           if r["split"] == split]
  granularity = collections.Counter()
  for r in grefs:
    kind = "no-target" if r["no_target"] else "multi-object" if len(r["ann_id"]) > 1 else "object"
    granularity[kind] += len(r["sentences"])
  return grefs, granularity


def test_index_counts_and_resume(synthetic_dir, tmp_path):
  out = str(tmp_path / "train")
  argv = ["--dataset", "synthetic_grefcoco", "--data-dir", synthetic_dir, "--split", "train", "--out", out,
          "--num-shards", "3", "--workers", "2"]
  index = prepare_data.main(argv)
  grefs, granularity = _expected(synthetic_dir, "train")
  instances = json.load(open(os.path.join(synthetic_dir, "grefcoco", "instances.json")))
  image_ids = {r["image_id"] for r in grefs}
  assert index["num_images"] == len(image_ids)
  assert index["num_refs"] == len(grefs)
  assert index["num_samples"] == sum(len(r["sentences"]) for r in grefs)
  assert index["num_masks"] == sum(a["image_id"] in image_ids for a in instances["annotations"])
  assert index["granularity_samples"] == dict(sorted(granularity.items()))
  assert set(index["source_checksums"]) == {"instances.json", "grefs(unc).json"}
  assert index["skipped_bad"] == {}
  assert len(records.SplitSource(out)) == index["num_samples"]

  shard_paths = [os.path.join(out, records.shard_name(k, 3)) for k in range(3)]
  os.remove(shard_paths[1])
  stamps = {p: os.stat(p).st_mtime_ns for p in (shard_paths[0], shard_paths[2])}
  again = prepare_data.main(argv[:-2] + ["--workers", "1"])
  assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # completed shards are not rewritten
  assert os.path.exists(shard_paths[1])
  assert again == index


def test_skip_bad_counts_land_in_index(synthetic_dir, tmp_path):
  data = tmp_path / "copy"
  os.makedirs(data / "grefcoco")
  os.symlink(os.path.join(synthetic_dir, "images"), data / "images")
  os.symlink(os.path.join(synthetic_dir, "grefcoco", "instances.json"), data / "grefcoco" / "instances.json")
  grefs = json.load(open(os.path.join(synthetic_dir, "grefcoco", "grefs(unc).json")))
  val = [i for i, r in enumerate(grefs) if r["split"] == "val"]
  grefs[val[0]]["ann_id"] = [123456]
  del grefs[val[-1]]["sentences"]
  (data / "grefcoco" / "grefs(unc).json").write_text(json.dumps(grefs))
  out = str(tmp_path / "val")
  argv = ["--dataset", "synthetic_grefcoco", "--data-dir", str(data), "--split", "val", "--out", out,
          "--num-shards", "2"]
  with pytest.raises(ValueError, match=r"grefs\(unc\).json entry \d+: ann_id 123456 not in"):
    prepare_data.main(argv)
  index = prepare_data.main(argv + ["--skip-bad"])
  assert index["skipped_bad"] == {"missing_key": 1, "unknown_annotation": 1}
  kept = [r for i, r in enumerate(grefs) if r["split"] == "val" and i not in (val[0], val[-1])]
  assert index["num_refs"] == len(kept)


def test_tfds_style_data_source(synthetic_dir, tmp_path):
  from unires_jax.data import tfds_builder

  out = tmp_path / "prepared" / "synthetic_cris" / "val"
  index = prepare_data.main(["--dataset", "synthetic_cris", "--data-dir", synthetic_dir, "--split", "val",
                             "--out", str(out)])
  assert tfds_builder.prepared_splits(str(tmp_path / "prepared")) == {"synthetic_cris/val": str(out)}
  source = tfds_builder.data_source("synthetic_cris", "val", str(tmp_path / "prepared"))
  assert len(source) == index["num_samples"]
  entries = json.load(open(os.path.join(synthetic_dir, "cris", "anns", synthetic.CRIS_NAME, "val.json")))
  expected = {(e["segment_id"], s["sent_id"]) for e in entries for s in e["sentences"]}
  assert {(s["ids"]["ref_id"], s["ids"]["sent_id"]) for s in source.__getitems__(range(len(source)))} == expected
  with pytest.raises(KeyError, match="synthetic_cris/val"):
    tfds_builder.data_source("refcoco", "val", str(tmp_path / "prepared"))
