"""Inference from a checkpoint: prompts equal the pipeline's, scripts/predict.py outputs and errors,
write_predictions → scripts/eval.py scoring on the synthetic set."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import configs.toy as toy_config
from configs.eval import synthetic as synthetic_eval
from scripts import predict as predict_script
from unires_jax.data import pipeline, readers, records, synthetic
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.eval import checkpoint_io, inference, scoring

PROMPT_KEYS = ("image_low", "image_high", "object_boxes", "object_box_mask", "part_boxes", "part_box_mask")


def _eval_boxes(record: dict) -> dict:
  """The boxes the eval pipeline feeds for a record (the toy config's box_source 'annotations': its GT boxes)."""
  return {kind: [a["bbox"] for a in record["annotations"] if a["granularity"] == kind] for kind in ("object", "part")}


def test_prompt_batch_equals_the_eval_pipeline(tmp_path):
  data_dir = synthetic.ensure_synthetic(str(tmp_path / "synthetic"), num_images=4)
  split_dir = str(tmp_path / "prepared" / "val")
  records.write_split(readers.DATASETS.lookup("synthetic_cris")(data_dir, "val"), split_dir, num_shards=1)
  config = toy_config.get_config("quick")
  config.data.sources = [dict(dir=split_dir, weight=1.0)]
  config.data.toy_tokenizer_prefix = str(tmp_path / "toy_tokenizer")
  config.data.batch_size = 4
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(config))
  expected = next(iter(pipeline.make_eval_iterator(config, split_dir, process_index=0, process_count=1)))
  source = records.SplitSource(split_dir)
  rows = [int(i) for i in expected["sample_index"] if i >= 0]
  samples = [source.sample(i) for i in rows]
  batch = inference.make_prompt_batch(config, tokenizer, [pipeline.decode_image(s["record"]) for s in samples],
                                      [s["sentence"]["sent"] for s in samples],
                                      [_eval_boxes(s["record"]) for s in samples])
  for key in PROMPT_KEYS:
    np.testing.assert_allclose(batch[key], expected[key][:len(rows)], atol=1e-6, err_msg=key)
  ends = np.argmax(batch["loss_mask"] > 0, axis=1)
  np.testing.assert_array_equal(ends, np.argmax(expected["loss_mask"][:len(rows)] > 0, axis=1))
  for row, end in enumerate(ends):
    for key in ("input_ids", "token_type", "attention_mask"):
      np.testing.assert_array_equal(batch[key][row, :end + 1], expected[key][row, :end + 1], err_msg=key)
    assert not batch["attention_mask"][row, end + 1:].any()


def test_no_boxes_means_every_box_slot_is_masked(tmp_path):
  data_dir = synthetic.ensure_synthetic(str(tmp_path / "synthetic"), num_images=2)
  split_dir = str(tmp_path / "prepared")
  records.write_split(readers.DATASETS.lookup("synthetic_cris")(data_dir, "val"), split_dir, num_shards=1)
  config = toy_config.get_config("quick")
  config.data.sources = [dict(dir=split_dir, weight=1.0)]
  config.data.toy_tokenizer_prefix = str(tmp_path / "toy_tokenizer")
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(config))
  image = np.zeros((30, 50, 3), np.uint8)
  batch = inference.make_prompt_batch(config, tokenizer, [image, image], ["the tree", "the tree"],
                                      [None, {"object": [[0, 0, 25, 15]]}])
  assert not batch["object_box_mask"][0].any() and not batch["part_box_mask"].any()
  np.testing.assert_array_equal(batch["object_box_mask"][1], [True, False, False, False])
  np.testing.assert_allclose(batch["object_boxes"][1, 0], np.array([0, 0, 25, 15]) * 128 / 50, rtol=1e-6)
  slots = batch["token_type"] >= pipeline.OBJECT_SLOT
  assert not batch["attention_mask"][0][slots[0]].any()
  assert batch["attention_mask"][1][slots[1]].sum() == 1


def test_rebase_path_finds_files_of_a_moved_run(tmp_path):
  (tmp_path / "prepared").mkdir()
  (tmp_path / "prepared" / "toy_tokenizer.model").write_bytes(b"")
  moved = checkpoint_io.rebase_path("/old/place/run/prepared/toy_tokenizer.model", str(tmp_path))
  assert moved == str(tmp_path / "prepared" / "toy_tokenizer.model")
  assert checkpoint_io.rebase_path("/old/none.model", str(tmp_path)) == "/old/none.model"


def test_predict_errors_name_the_missing_image_and_checkpoint(tmp_path):
  image = tmp_path / "image.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  with pytest.raises(FileNotFoundError, match="image .*missing.png.* does not exist"):
    predict_script.main(["--checkpoint", str(tmp_path), "--image", str(tmp_path / "missing.png"), "--text", "x",
                         "--out", str(tmp_path / "o.png")])
  with pytest.raises(FileNotFoundError, match="--checkpoint .*nowhere.* does not exist"):
    predict_script.main(["--checkpoint", str(tmp_path / "nowhere"), "--image", str(image), "--text", "x",
                         "--out", str(tmp_path / "o.png")])
  with pytest.raises(FileNotFoundError, match="neither a run workdir"):
    predict_script.main(["--checkpoint", str(tmp_path), "--image", str(image), "--text", "x",
                         "--out", str(tmp_path / "o.png")])
  listing = tmp_path / "list.jsonl"
  listing.write_text(json.dumps({"image": str(image), "text": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"line 1: field\(s\) \['out'\] missing"):
    predict_script.main(["--checkpoint", str(tmp_path), "--input", str(listing)])
  with pytest.raises(ValueError, match="boxes"):
    predict_script.main(["--checkpoint", str(tmp_path), "--image", str(image), "--text", "x", "--out",
                         str(tmp_path / "o.png"), "--boxes", '{"object": [[1, 2, 3]]}'])


# ------------------------------------------- with a trained checkpoint (the `trained_run` fixture, conftest.py)


@pytest.mark.slow
def test_predict_writes_mask_and_overlay_and_batches_agree(trained_run, tmp_path):
  images = sorted(os.listdir(os.path.join(trained_run, "synthetic", "images")))[:3]
  paths = [os.path.join(trained_run, "synthetic", "images", name) for name in images]
  single = predict_script.main(["--checkpoint", trained_run, "--image", paths[0], "--text", "the roof of the house",
                                "--out", str(tmp_path / "single.png")])
  assert os.path.exists(tmp_path / "single.png") and os.path.exists(tmp_path / "single_overlay.png")
  listing = tmp_path / "list.jsonl"
  texts = ["the roof of the house", "the tree on the left", "the robot"]
  listing.write_text("".join(json.dumps({"image": p, "text": t, "out": str(tmp_path / f"many_{i}.png")}) + "\n"
                             for i, (p, t) in enumerate(zip(paths, texts))))
  many = predict_script.main(["--checkpoint", trained_run, "--input", str(listing), "--batch_size", "2"])
  assert len(many) == 3 and many[0]["answer"] == single[0]["answer"]
  pixels = np.asarray(Image.open(paths[0]).convert("RGB"))
  mask = np.asarray(Image.open(tmp_path / "single.png"))
  assert mask.shape == pixels.shape[:2] and set(np.unique(mask)) <= {0, 255}
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "many_0.png")), mask)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "single_overlay.png")),
                                inference.overlay(pixels, mask > 0))
  assert (mask.sum() == 0) == single[0]["no_target"]


@pytest.mark.slow
def test_write_predictions_is_complete_and_scores_like_the_evaluator(trained_run, tmp_path):
  config = synthetic_eval.get_config("val")
  config.checkpoint = trained_run
  config.data_dir = os.path.join(trained_run, "synthetic")
  config.output_dir = str(tmp_path / "eval")
  path = inference.write_predictions(config)
  assert path == str(tmp_path / "eval" / "generation" / "predictions.jsonl")
  report = scoring.score_from_config(dict_config(config, predictions=path))
  coverage = report["splits"]["val"]["coverage"]
  assert coverage["samples"] > 0 and coverage["num_missing"] == coverage["num_duplicate"] == 0
  with open(path) as f:
    assert sum(1 for line in f if line.strip()) == coverage["samples"]
  with open(tmp_path / "eval" / "generation" / "metrics.json") as f:
    in_loop = json.load(f)["splits"]["val"]["metrics"]
  for name, value in report["splits"]["val"]["metrics"].items():
    if value == value:  # not NaN
      assert in_loop[name] == pytest.approx(value, abs=1e-6), name
  # A second run reuses the prepared records.
  stamp = tmp_path / "eval" / "prepared" / "val" / "prepared_from.json"
  before = os.path.getmtime(stamp)
  inference.write_predictions(config)
  assert os.path.getmtime(stamp) == before


def dict_config(config, **overrides):
  copy = config.copy_and_resolve_references()
  with copy.unlocked():
    for key, value in overrides.items():
      setattr(copy, key, value)
  return copy
