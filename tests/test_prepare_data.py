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


def test_cris_split_serves_every_sentence_as_one_sample(synthetic_dir, tmp_path):
  out = str(tmp_path / "prepared" / "synthetic_cris" / "val")
  index = prepare_data.main(["--dataset", "synthetic_cris", "--data-dir", synthetic_dir, "--split", "val",
                             "--out", out])
  source = records.SplitSource(out)
  assert len(source) == index["num_samples"]
  entries = json.load(open(os.path.join(synthetic_dir, "cris", "anns", synthetic.CRIS_NAME, "val.json")))
  expected = {(e["segment_id"], s["sent_id"]) for e in entries for s in e["sentences"]}
  assert {(source.sample(i)["ids"]["ref_id"], source.sample(i)["ids"]["sent_id"]) for i in range(len(source))} \
      == expected


def _detection_files(synthetic_dir, tmp_path, split):
  """An object file with two boxes per image of `split` (one crossing the right edge), a low-score box, and ids
  of other splits and of no image; a part file per split (`{split}` in its path)."""
  instances = json.load(open(os.path.join(synthetic_dir, "grefcoco", "instances.json")))
  split_ids = {r["image_id"] for r in json.load(open(os.path.join(synthetic_dir, "grefcoco", "grefs(unc).json")))
               if r["split"] == split}
  objects, parts, other_ids = [], [], set()
  for image in instances["images"]:
    if image["id"] not in split_ids:
      other_ids.add(image["id"])
    width = image["width"]
    objects += [{"image_id": image["id"], "bbox": [2, 3, 10, 12], "score": 0.6, "category_id": 1},
                {"image_id": image["id"], "bbox": [width - 5, 0, 20, 8], "score": 0.9},
                {"image_id": image["id"], "bbox": [1, 1, 4, 4], "score": 0.05}]
    parts.append({"image_id": image["id"], "bbox": [4, 4, 3, 2], "score": 0.7})
  objects.append({"image_id": 123456, "bbox": [0, 0, 1, 1], "score": 0.9})
  (tmp_path / "objects.json").write_text(json.dumps(objects))
  (tmp_path / f"{split}_parts.json").write_text(json.dumps(parts))
  widths = {image["id"]: image["width"] for image in instances["images"]}
  return str(tmp_path / "objects.json"), str(tmp_path / "{split}_parts.json"), split_ids, other_ids, widths


def test_detection_proposals_are_stored_with_their_source_and_counted(synthetic_dir, tmp_path, capsys):
  object_file, part_file, split_ids, other_ids, widths = _detection_files(synthetic_dir, tmp_path, "train")
  out = str(tmp_path / "train")
  argv = ["--dataset", "synthetic_grefcoco", "--data-dir", synthetic_dir, "--split", "train", "--out", out,
          "--num-shards", "3", "--object-proposals", object_file, "--part-proposals", part_file,
          "--proposal-score-threshold", "0.1"]
  index = prepare_data.main(argv)
  describe = (f"detections (objects {object_file}, parts {part_file}; score >= 0.1, all per image, "
              f"match by image_id)")
  assert index["proposals"]["sources"] == {describe: len(split_ids)}
  assert index["proposals"]["object_boxes"] == 2 * len(split_ids)
  assert index["proposals"]["part_boxes"] == len(split_ids)
  source = records.SplitSource(out)
  for k in range(source.num_records):
    record = source.record(k)
    width = widths[record["image_id"]]
    assert record["proposals"] == {"object": [[width - 5.0, 0.0, float(width), 8.0], [2.0, 3.0, 12.0, 15.0]],
                                   "object_scores": [0.8999999761581421, 0.6000000238418579],
                                   "part": [[4.0, 4.0, 7.0, 6.0]], "part_scores": [0.699999988079071],
                                   "source": describe}
  summary = index["proposals"]["summary"]
  assert summary["object"]["clipped"] == len(split_ids) and summary["object"]["below_threshold"] == len(split_ids)
  assert summary["object"]["images"] == summary["object"]["images_with_boxes"] == len(split_ids)
  files = summary["object"]["files"][object_file]
  assert files["unmatched_ids"] == len(other_ids) + 1
  assert files["unmatched"] == sorted(other_ids | {123456})[:20]
  assert summary["part"]["files"][str(tmp_path / "train_parts.json")]["unmatched_ids"] == len(other_ids)
  assert {"objects.json", "train_parts.json"} <= set(index["source_checksums"])
  printed = capsys.readouterr().out
  assert f"{len(other_ids) + 1} ids match no image" in printed and f"{len(split_ids)} clipped" in printed
  # Rerunning with other proposals over the finished shards is refused, naming a shard.
  with pytest.raises(ValueError, match=r"records-00000-of-00003.array_record holds other proposals"):
    prepare_data.main(argv[:-2])


def test_proposal_flags_without_a_file_and_bad_files_are_refused(synthetic_dir, tmp_path):
  base = ["--dataset", "synthetic_grefcoco", "--data-dir", synthetic_dir, "--split", "val",
          "--out", str(tmp_path / "val")]
  with pytest.raises(ValueError, match="--proposal-top-k need --object-proposals or --part-proposals"):
    prepare_data.main(base + ["--proposal-top-k", "3"])
  (tmp_path / "bad.json").write_text('[{"image_id": 1, "bbox": [0, 0, -1, 2], "score": 0.5}]')
  with pytest.raises(ValueError, match=r"bad.json entry 0: 'bbox' has a negative width"):
    prepare_data.main(base + ["--object-proposals", str(tmp_path / "bad.json")])


def test_the_command_line_prints_known_errors_in_one_line(tmp_path):
  import subprocess
  import sys

  result = subprocess.run([sys.executable, "scripts/prepare_data.py", "--dataset", "synthetic_grefcoco", "--data-dir",
                           str(tmp_path), "--split", "val", "--out", str(tmp_path / "out"), "--proposal-top-k", "3"],
                          capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2
  assert result.stderr.strip() == ("prepare_data.py: error: --proposal-top-k need --object-proposals or "
                                   "--part-proposals")


def _copy_with(synthetic_dir, tmp_path, edit_instances=None, edit_images=None):
  """A gRefCOCO-layout copy of the synthetic set: instances.json edited, images copied (and edited)."""
  import shutil
  data = tmp_path / "copy"
  os.makedirs(data / "grefcoco")
  shutil.copytree(os.path.join(synthetic_dir, "images"), data / "images")
  shutil.copy(os.path.join(synthetic_dir, "grefcoco", "grefs(unc).json"), data / "grefcoco")
  instances = json.load(open(os.path.join(synthetic_dir, "grefcoco", "instances.json")))
  if edit_instances:
    edit_instances(instances)
  (data / "grefcoco" / "instances.json").write_text(json.dumps(instances))
  if edit_images:
    edit_images(data / "images", instances)
  return data, instances


def _image_ids(synthetic_dir, split="val"):
  grefs = json.load(open(os.path.join(synthetic_dir, "grefcoco", "grefs(unc).json")))
  return sorted({r["image_id"] for r in grefs if r["split"] == split})


def test_images_dropped_while_reading_are_counted_and_listed(synthetic_dir, tmp_path):
  """A truncated and a missing image: an error naming the file without --skip-bad; counted by reason and listed
  with their location with it, in index.json and on the console."""
  first, second = _image_ids(synthetic_dir, "train")[:2]

  def damage(images_dir, instances):
    names = {im["id"]: im["file_name"] for im in instances["images"]}
    path = images_dir / names[first]
    path.write_bytes(path.read_bytes()[:200])  # the header survives, the pixels do not
    os.remove(images_dir / names[second])

  data, instances = _copy_with(synthetic_dir, tmp_path, edit_images=damage)
  names = {im["id"]: im["file_name"] for im in instances["images"]}
  out = str(tmp_path / "train")
  argv = ["--dataset", "synthetic_grefcoco", "--data-dir", str(data), "--split", "train", "--out", out,
          "--num-shards", "2"]
  with pytest.raises(ValueError, match=rf"image {first}: image .*{names[first]}.* cannot be decoded"):
    prepare_data.main(argv)
  index = prepare_data.main(argv + ["--skip-bad"])
  assert index["skipped_bad"] == {"bad_image": 1, "missing_image": 1}
  listed = index["skipped_bad_entries"]
  assert len(listed) == 2 and any(names[first] in e for e in listed) and any(names[second] in e for e in listed)
  assert index["num_images"] == len(_image_ids(synthetic_dir, "train")) - 2


@pytest.mark.parametrize("bbox, reason", [(["a", 1, 2, 3], "finite numbers"), ([float("nan"), 1, 2, 3], "finite"),
                                          ([1, 1, -5, 3], "negative width"), ([100, 80, 60, 30], "outside")])
def test_bad_boxes_are_refused_naming_the_entry_or_skipped(synthetic_dir, tmp_path, bbox, reason):
  image_id = _image_ids(synthetic_dir)[0]
  target = {}

  def edit(instances):
    k = next(k for k, a in enumerate(instances["annotations"]) if a["image_id"] == image_id)
    instances["annotations"][k]["bbox"] = bbox
    target.update(index=k, id=instances["annotations"][k]["id"])

  data, _ = _copy_with(synthetic_dir, tmp_path, edit_instances=edit)
  out = str(tmp_path / "val")
  argv = ["--dataset", "synthetic_grefcoco", "--data-dir", str(data), "--split", "val", "--out", out]
  with pytest.raises(ValueError, match=rf"instances.json annotations\[{target['index']}\] \(id {target['id']}\): "
                                       rf"bbox .*{reason}"):
    prepare_data.main(argv)
  index = prepare_data.main(argv + ["--skip-bad"])
  assert index["skipped_bad"]["bad_bbox"] == 1


def test_workers_do_not_fork_a_process_that_runs_jax(synthetic_dir, tmp_path):
  import warnings

  import jax
  jax.devices()  # JAX's threads are running in this process
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    index = prepare_data.prepare("synthetic_grefcoco", synthetic_dir, "val", str(tmp_path / "val"), num_shards=2,
                                 workers=2, progress=False)
  assert index["num_shards"] == 2 and index["num_images"] == len(_image_ids(synthetic_dir))
  assert not [w for w in caught if "fork" in str(w.message)], [str(w.message) for w in caught]
