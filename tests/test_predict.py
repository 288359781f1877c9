"""Inference from a checkpoint: prompts equal the pipeline's, scripts/predict.py outputs and errors, the Predictor
(batch 1 = batch 8, proposals from the run's source, drawn in the overlay), write_predictions → scripts/eval.py
scoring on the synthetic set with its provenance."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import configs.toy as toy_config
from configs.eval import synthetic as synthetic_eval
from scripts import predict as predict_script
from unires_jax.data import pipeline, records, synthetic
from unires_jax.data import datasets
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax import proposals as proposals_lib
from unires_jax.eval import checkpoint_eval, checkpoint_io, inference, predictor as predictor_lib, provenance, scoring

PROMPT_KEYS = ("image_low", "image_high", "object_boxes", "object_box_mask", "part_boxes", "part_box_mask")


def _eval_boxes(record: dict) -> dict:
  """The boxes the eval pipeline feeds for a record with `data.box_source='annotations'`: its GT boxes."""
  return {kind: [a["bbox"] for a in record["annotations"] if a["granularity"] == kind] for kind in ("object", "part")}


def test_prompt_batch_equals_the_eval_pipeline(tmp_path):
  data_dir = synthetic.ensure_synthetic(str(tmp_path / "synthetic"), num_images=4)
  split_dir = str(tmp_path / "prepared" / "val")
  records.write_split(datasets.DATASETS.lookup("synthetic_cris")(data_dir, "val"), split_dir, num_shards=1)
  config = toy_config.get_config("quick")
  config.data.sources = [dict(dir=split_dir, weight=1.0)]
  config.data.toy_tokenizer_prefix = str(tmp_path / "toy_tokenizer")
  config.data.batch_size = 4
  config.data.box_source = "annotations"  # the pipeline reads the GT boxes that `_eval_boxes` hands generation
  tokenizer = tokenizer_lib.Tokenizer(pipeline.ensure_toy_tokenizer(config))
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
  records.write_split(datasets.DATASETS.lookup("synthetic_cris")(data_dir, "val"), split_dir, num_shards=1)
  config = toy_config.get_config("quick")
  config.data.sources = [dict(dir=split_dir, weight=1.0)]
  config.data.toy_tokenizer_prefix = str(tmp_path / "toy_tokenizer")
  tokenizer = tokenizer_lib.Tokenizer(pipeline.ensure_toy_tokenizer(config))
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


@pytest.mark.parametrize("extra, message", [
    (["--text", "   "], r"--text: the phrase '   ' is empty or only whitespace"),
    (["--text", "x", "--boxes", '{"object": [[NaN, 0, 4, 4]]}'], r"--boxes: boxes\['object'\]\[0\]: box .* NaN"),
    (["--text", "x", "--boxes", '{"part": [[0, 0, 4, 4], [6, 0, 2, 4]]}'],
     r"boxes\['part'\]\[1\]: box \[6, 0, 2, 4\] has x1 < x0"),
])
def test_predict_refuses_blank_phrases_and_bad_boxes_before_loading(tmp_path, extra, message):
  image = tmp_path / "image.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  with pytest.raises(ValueError, match=message):
    predict_script.main(["--checkpoint", str(tmp_path / "nowhere"), "--image", str(image), "--out",
                         str(tmp_path / "o.png"), *extra])


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
  before = config.to_dict()
  written = checkpoint_eval.write_predictions(config)
  assert config.to_dict() == before  # write_predictions leaves its config alone
  path = written.predictions
  assert path == str(tmp_path / "eval" / "generation" / "predictions.jsonl")
  assert written.output_dir == str(tmp_path / "eval")
  step = newest_step(trained_run)
  expected = provenance.MadeWith("none (no boxes)", False, "per_sentence",
                                 os.path.join(trained_run, "checkpoints", str(step)), step)
  assert written.made_with == expected == provenance.read_sidecar(path)
  # The prepared records carry the source's (empty) proposals, which is all the pipeline reads.
  prepared = records.SplitSource(str(tmp_path / "eval" / "prepared" / "val")).record(0)["proposals"]
  assert prepared["source"] == "none (no boxes)" and prepared["object"] == prepared["part"] == []
  report = scoring.score_from_config(dict_config(config, predictions=path))
  assert report["made_with"] == expected.to_json()
  assert report["table"].startswith(f"Made with: boxes none (no boxes); one sample per sentence; IoU at the "
                                    f"original image resolution; checkpoint {expected.checkpoint}, step {step}.")
  in_loop_report = json.loads((tmp_path / "eval" / "generation" / "metrics.json").read_text())
  answers = in_loop_report["splits"]["val"]["answers"]
  assert sum(answers.values()) == report["splits"]["val"]["coverage"]["samples"]
  assert report["splits"]["val"]["invalid"] == answers["invalid"]
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
  checkpoint_eval.write_predictions(config)
  assert os.path.getmtime(stamp) == before


def newest_step(run: str) -> int:
  return max(int(name) for name in os.listdir(os.path.join(run, "checkpoints")) if name.isdigit())


def dict_config(config, **overrides):
  copy = config.copy_and_resolve_references()
  with copy.unlocked():
    for key, value in overrides.items():
      setattr(copy, key, value)
  return copy


# ----------------------------------------------------------------------------- the same checkpoint in PyTorch


NO_JAX = ("import sys\n"
          "for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'orbax.checkpoint', 'grain'):\n"
          "  sys.modules[name] = None  # `import jax` now fails\n")


@pytest.fixture(scope="module")
def exported_run(trained_run, tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from scripts import convert_to_pytorch

  out = str(tmp_path_factory.mktemp("export"))
  convert_to_pytorch.main(["--workdir", trained_run, "--out", out])
  return out


@pytest.mark.slow
@pytest.mark.torch
def test_export_card_names_the_run(trained_run, exported_run):
  with open(os.path.join(exported_run, "README.md")) as f:
    card = f.read()
  with open(os.path.join(trained_run, "config.json")) as f:
    run_config = json.load(f)
  step = newest_step(trained_run)
  assert os.path.join(trained_run, "checkpoints", str(step), "state") in card and f"step {step}" in card
  for source in run_config["data"]["sources"]:
    assert source["dir"] in card
  assert '"hidden_size"' in card  # the model config


@pytest.mark.slow
@pytest.mark.torch
def test_export_predicts_in_a_process_without_jax(trained_run, exported_run, tmp_path):
  import subprocess
  import sys

  image = os.path.join(trained_run, "synthetic", "images", sorted(os.listdir(os.path.join(
      trained_run, "synthetic", "images")))[0])
  code = NO_JAX + (
      "import json, numpy as np\nfrom PIL import Image\n"
      "try:\n  import jax\nexcept ImportError:\n  pass\nelse:\n  raise SystemExit('jax imported')\n"
      "from unires_jax.convert.torch_model import UniRESTorch\n"
      f"model = UniRESTorch.from_exported({exported_run!r})\n"
      f"pixels = np.asarray(Image.open({image!r}).convert('RGB'))\n"
      "out = model.predict(pixels, 'the roof of the house')\n"
      "print(json.dumps({'shape': list(out['mask'].shape), 'no_target': out['no_target'], 'answer': out['answer'],"
      " 'area': int(out['mask'].sum()), 'jax': [m for m in sys.modules if m.startswith(('jax', 'flax')) and"
      " sys.modules[m] is not None]}))\n")
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600,
                          env=dict(os.environ, PYTHONPATH=root))
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  pixels = np.asarray(Image.open(image).convert("RGB"))
  assert got["shape"] == list(pixels.shape[:2]) and got["jax"] == []
  assert got["no_target"] == (got["area"] == 0) or not got["no_target"]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.slow
@pytest.mark.torch
def test_export_predictions_equal_jax_over_the_val_split(trained_run, exported_run, tmp_path):
  from scripts import predict_export
  from unires_jax.convert.torch_model import UniRESTorch
  from unires_jax.eval import predictions as predictions_lib

  config = synthetic_eval.get_config("val")
  config.checkpoint = trained_run
  config.data_dir = os.path.join(trained_run, "synthetic")
  config.output_dir = str(tmp_path / "eval")
  jax_path = checkpoint_eval.write_predictions(config).predictions
  box_source = "proposals"  # benchmark evaluation reads the proposals attached to the prepared records
  torch_path = str(tmp_path / "torch_predictions.jsonl")
  count = predict_export.predict_split(UniRESTorch.from_exported(exported_run).predictor(), str(tmp_path / "eval" / "prepared" / "val"),
                                       torch_path, box_source=box_source)
  want = {p.key: p for p in predictions_lib.read_predictions(jax_path)}
  got = {p.key: p for p in predictions_lib.read_predictions(torch_path)}
  assert count == len(want) == len(got) and set(got) == set(want)
  # A 3-step checkpoint may answer no-target everywhere; the mask path itself is compared in
  # test_export_generation_equals_jax (raw logits, whatever the answer).
  for key, prediction in want.items():
    assert got[key].no_target == prediction.no_target, key
    assert _iou(got[key].predicted_mask(), prediction.predicted_mask()) >= 0.999, key
  jax_scores = scoring.score_from_config(dict_config(config, predictions=jax_path))["splits"]["val"]["metrics"]
  torch_scores = scoring.score_from_config(dict_config(config, predictions=torch_path))["splits"]["val"]["metrics"]
  for name, value in jax_scores.items():
    if value is not None and value == value:
      assert torch_scores[name] == pytest.approx(value, abs=0.1), name


@pytest.mark.slow
@pytest.mark.torch
def test_export_generation_equals_jax(trained_run, exported_run):
  """The same prompt batch through JAX `make_generate_fn` and PyTorch `generate`: the same tokens and [SEG]
  decisions, and canvas mask logits (decoded whether or not [SEG] came) that threshold to IoU >= 0.999."""
  import torch

  from unires_jax.convert import torch_generate
  from unires_jax.convert.torch_model import UniRESTorch
  from unires_jax.train import state as state_lib

  loaded = checkpoint_io.load_checkpoint(trained_run)
  run_config = loaded.config
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(run_config))
  names = sorted(os.listdir(os.path.join(trained_run, "synthetic", "images")))[:3]
  images = [np.asarray(Image.open(os.path.join(trained_run, "synthetic", "images", n)).convert("RGB")) for n in names]
  phrases = ["the roof of the house", "the tree on the left", "the robot"]
  boxes = [None, {"object": [[2, 3, 40, 30]]}, {"object": [[0, 0, 20, 20]], "part": [[1, 1, 8, 9]]}]
  batch = inference.make_prompt_batch(run_config, tokenizer, images, phrases, boxes)
  seg_id = tokenizer.special_ids[tokenizer_lib.SEG_TOKEN]
  steps = 6
  model = state_lib.build_model(run_config.model)
  want = inference.make_generate_fn(model, seg_id, tokenizer.eos_id, tokenizer.pad_id, steps)(loaded.params, batch)
  export = UniRESTorch.from_exported(exported_run).predictor()
  got = torch_generate.generate(export.model, {k: torch.from_numpy(v) for k, v in batch.items()}, seg_id,
                                tokenizer.eos_id, tokenizer.pad_id, steps)
  np.testing.assert_array_equal(got["tokens"].numpy(), np.asarray(want["tokens"]))
  np.testing.assert_array_equal(got["has_seg"].numpy(), np.asarray(want["has_seg"]))
  want_logits, got_logits = np.asarray(want["mask_logits"]), got["mask_logits"].numpy()
  assert np.abs(want_logits).max() > 0.05
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-3, rtol=0)
  for row in range(len(images)):
    assert _iou(got_logits[row] > 0, want_logits[row] > 0) >= 0.999, row


FIXED_BOXES = {"object": [[2.0, 3.0, 40.0, 50.0], [10.0, 10.0, 30.0, 20.0]], "part": [[5.0, 5.0, 15.0, 12.0]]}


@proposals_lib.SOURCES.register("test_fixed_boxes")
class FixedBoxes:
  """A stand-in detector for the tests: the same boxes on every image."""
  is_ground_truth = False

  def __init__(self, config=None):
    del config

  def describe(self) -> str:
    return "test_fixed_boxes"

  def __call__(self, images):
    return [proposals_lib.ImageProposals(np.asarray(FIXED_BOXES["object"], np.float32),
                                         np.asarray(FIXED_BOXES["part"], np.float32), np.ones((2,), np.float32),
                                         np.ones((1,), np.float32)) for _ in images]


def test_overlay_outlines_object_and_part_boxes():
  pixels = np.zeros((12, 16, 3), np.uint8)
  mask = np.zeros((12, 16), bool)
  out = inference.overlay(pixels, mask, boxes={"object": [[2, 3, 6, 8]], "part": [[10, 1, 14, 4]]})
  yellow, cyan = inference.BOX_COLOURS["object"], inference.BOX_COLOURS["part"]
  assert tuple(out[3, 2]) == yellow and tuple(out[7, 5]) == yellow and tuple(out[3, 4]) == yellow  # edges, 1 px
  assert tuple(out[5, 4]) == (0, 0, 0)  # inside stays
  assert tuple(out[1, 10]) == cyan and tuple(out[3, 13]) == cyan
  np.testing.assert_array_equal(inference.overlay(pixels, mask, boxes={"object": [], "part": []}), pixels)


@pytest.mark.slow
def test_batch_of_one_and_batch_of_eight_give_identical_answers_and_masks(trained_run):
  import jax

  names = sorted(os.listdir(os.path.join(trained_run, "synthetic", "images")))[:8]
  images = [np.asarray(Image.open(os.path.join(trained_run, "synthetic", "images", n)).convert("RGB"))
            for n in names]
  phrases = ["the roof", "the tree on the left of the big red house", "the robot", "the purple robot",
             "the door of the blue house", "all trees", "the head of the yellow robot", "the crown"]
  boxes = [None, FIXED_BOXES, None, {"object": FIXED_BOXES["object"]}, None, None, FIXED_BOXES, None]
  one_device = jax.devices()[:1]
  single = predictor_lib.Predictor(trained_run, batch_size=1, devices=one_device)
  eight = predictor_lib.Predictor(trained_run, batch_size=8, devices=one_device)
  assert (single.batch_size, eight.batch_size) == (1, 8)
  alone = [single.predict([image], [phrase], [box])[0] for image, phrase, box in zip(images, phrases, boxes)]
  together = eight.predict(images, phrases, boxes)
  padded = eight.predict(images[:5], phrases[:5], boxes[:5])  # 3 padding rows
  for reference, batched in zip(alone, together):
    assert batched.answer == reference.answer and batched.no_target == reference.no_target
    np.testing.assert_array_equal(batched.mask, reference.mask)
    assert batched.proposals == reference.proposals
  for reference, batched in zip(alone, padded):
    assert batched.answer == reference.answer
    np.testing.assert_array_equal(batched.mask, reference.mask)
  assert together[1].proposals == {"source": predictor_lib.GIVEN, **FIXED_BOXES}
  assert together[3].proposals["part"] == [] and together[0].proposals["source"] == "none (no boxes)"


@pytest.mark.slow
def test_predict_without_boxes_uses_the_runs_source_prints_and_draws_them(trained_run, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "overlays", "tensorboard"))
  config = json.loads((run / "config.json").read_text())
  config["proposals"] = {"source": "test_fixed_boxes"}
  (run / "config.json").write_text(json.dumps(config))
  image = os.path.join(run, "synthetic", "images", sorted(os.listdir(run / "synthetic" / "images"))[0])
  (result,) = predict_script.main(["--checkpoint", str(run), "--image", image, "--text", "the roof",
                                   "--out", str(tmp_path / "out.png")])
  printed = capsys.readouterr().out
  assert "proposals from the run's source test_fixed_boxes" in printed
  assert "2 object and 1 part boxes from test_fixed_boxes: object [[2.0, 3.0, 40.0, 50.0]" in printed
  assert result["boxes"] == {"source": "test_fixed_boxes", **FIXED_BOXES}
  pixels = np.asarray(Image.open(image).convert("RGB"))
  mask = np.asarray(Image.open(tmp_path / "out.png")) > 0
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out_overlay.png")),
                                inference.overlay(pixels, mask, boxes=FIXED_BOXES))
  # The trained run itself names no source: no boxes, and a note says so.
  predict_script.main(["--checkpoint", trained_run, "--image", image, "--text", "the roof",
                       "--out", str(tmp_path / "plain.png")])
  assert "the run config has no proposals section: no boxes" in capsys.readouterr().out


@pytest.mark.slow
def test_trainer_final_evaluation_labels_ground_truth_boxes(trained_run, tmp_path):
  from configs import common
  from unires_jax import sharding
  from unires_jax.eval import trainer_evals
  from unires_jax.train import state as state_lib

  loaded = checkpoint_io.load_checkpoint(trained_run)
  config = loaded.config
  val = os.path.join(trained_run, "prepared", "synthetic_grefcoco", "val")
  config.evals = {"synthetic/grefcoco": synthetic_eval.get_config("val")}
  config.evals["synthetic/grefcoco"].update(type="grefcoco", data_dir=os.path.join(trained_run, "synthetic"),
                                            proposals=common.proposals_config("annotations"), allow_gt_boxes=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  model = state_lib.build_model(config.model)
  params = inference.place_params(model, config.model, loaded.params, mesh, rules)
  workdir = str(tmp_path / "run")
  evaluate = trainer_evals.build(config, model, lambda p: p, mesh, rules, workdir)
  results = evaluate(params, 3, final=True)
  out = os.path.join(workdir, "eval", "step_3", "synthetic_grefcoco")
  report = json.loads(open(os.path.join(out, "metrics.json")).read())
  assert report["made_with"]["box_source"] == "annotations (ground-truth boxes)"
  assert report["made_with"]["warning"] == provenance.GROUND_TRUTH_WARNING
  assert report["made_with"]["checkpoint"] == os.path.join(workdir, "checkpoints", "3")
  assert open(os.path.join(out, "metrics.md")).read().startswith("> **GROUND-TRUTH BOXES**")
  assert provenance.read_sidecar(os.path.join(out, "predictions.jsonl")).ground_truth_boxes
  answers = report["splits"]["val"]["answers"]
  assert sum(answers.values()) == len(records.SplitSource(val))
  assert results["eval/synthetic/grefcoco"]["val/invalid"] == answers["invalid"]
  # The evaluated records carry the ground-truth boxes as their proposals, named by source.
  attached = records.SplitSource(os.path.join(workdir, "eval", "prepared", "synthetic_grefcoco", "val")).record(0)
  assert attached["proposals"]["source"] == "annotations (ground-truth boxes)"


@pytest.mark.slow
def test_phone_photo_long_phrase_and_missing_metadata(trained_run, tmp_path):
  """An EXIF-rotated photo gets its mask in the orientation shown; a 5000-character phrase is refused with its
  length; a step without its metadata is named with the step to use instead."""
  import shutil
  from unires_jax.data import images as images_lib
  from unires_jax import checkpointing as checkpoint_lib
  name = sorted(os.listdir(os.path.join(trained_run, "synthetic", "images")))[0]
  stored = np.asarray(Image.open(os.path.join(trained_run, "synthetic", "images", name)).convert("RGB"))
  exif = Image.Exif()
  exif[images_lib.EXIF_ORIENTATION_TAG] = 6  # shown turned 90° clockwise: portrait
  photo = tmp_path / "phone.png"
  Image.fromarray(stored).save(photo, exif=exif.tobytes())
  (result,) = predict_script.main(["--checkpoint", trained_run, "--image", str(photo), "--text", "the tree",
                                   "--out", str(tmp_path / "phone_mask.png")])
  assert np.asarray(Image.open(tmp_path / "phone_mask.png")).shape == (stored.shape[1], stored.shape[0])

  with pytest.raises(ValueError) as caught:
    predict_script.main(["--checkpoint", trained_run, "--image", str(photo), "--text", "tree " * 1000,
                         "--out", str(tmp_path / "long.png")])
  message = str(caught.value)
  assert "(4999 characters)" in message and "the limit is data.max_text_len" in message and len(message) < 400

  broken = tmp_path / "broken_run"
  shutil.copytree(trained_run, broken, ignore=shutil.ignore_patterns("synthetic", "prepared", "tensorboard"))
  newest = newest_step(trained_run)
  shutil.copytree(broken / "checkpoints" / str(newest), broken / "checkpoints" / str(newest + 1))
  os.remove(broken / "checkpoints" / str(newest + 1) / "state" / "_METADATA")
  with pytest.raises(checkpoint_lib.CheckpointUnreadableError,
                     match=rf"checkpoints/{newest + 1}/state.*_METADATA.*--step {newest}"):
    predict_script.main(["--checkpoint", str(broken), "--image", str(photo), "--text", "the tree",
                         "--out", str(tmp_path / "o.png")])
