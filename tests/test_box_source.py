"""Benchmark evaluation's box policy: ground-truth boxes refused unless allowed, proposals attached when a split is
prepared (and reused), the pipeline reading exactly those, and the trainer's final evaluation following the same
rule before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import configs.toy as toy_config
from configs import common
from configs.eval import synthetic as synthetic_eval
from unires_jax.data import pipeline, records, synthetic
from unires_jax.data import datasets
from unires_jax.eval import box_source, checkpoint_eval, loop, provenance

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return synthetic.ensure_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_images=8)


def _gt_boxes(record, granularity):
  return [list(map(float, a["bbox"])) for a in record["annotations"] if a["granularity"] == granularity]


def test_ground_truth_source_is_refused_unless_allowed():
  annotations = common.proposals_config("annotations")
  with pytest.raises(provenance.GroundTruthBoxesError,
                     match=r"eval config: the proposal source 'annotations \(ground-truth boxes\)' gives the model "
                           r"ground-truth boxes.*allow_gt_boxes=True"):
    box_source.eval_source(annotations, False, "eval config")
  with pytest.raises(provenance.GroundTruthBoxesError, match="'annotations' gives the model ground-truth boxes"):
    box_source.check_policy(annotations, False, "config.eval.proposals")
  assert box_source.eval_source(annotations, True, "eval config").is_ground_truth
  box_source.check_policy(annotations, True, "config.eval.proposals")
  none = box_source.eval_source(common.proposals_config("none"), False, "eval config")
  made_with = box_source.made_with(none, "per_sentence", "/run/checkpoints/3", 3)
  assert made_with == provenance.MadeWith("none (no boxes)", False, "per_sentence", "/run/checkpoints/3", 3)
  with pytest.raises(provenance.ProvenanceError, match="'merged'"):
    box_source.made_with(none, "merged", "/run", 3)


def test_proposals_are_attached_when_the_split_is_prepared_and_reused(data_dir, tmp_path):
  read = lambda: datasets.DATASETS.lookup("synthetic_cris")(data_dir, "val")
  out = str(tmp_path / "prepared")
  none_config = common.proposals_config("none")
  none = box_source.eval_source(none_config, False, "test")
  stamp = {"reader": "synthetic_cris", **box_source.source_stamp(none, none_config)}
  box_source.prepare_split(read, none, out, stamp, dataset="synthetic", split="val")
  source = records.SplitSource(out)
  assert source.num_records == len(list(read()))
  for index in range(source.num_records):
    proposals = source.record(index)["proposals"]
    assert proposals["object"] == proposals["part"] == [] and proposals["source"] == "none (no boxes)"
  before = os.path.getmtime(os.path.join(out, records.INDEX))
  box_source.prepare_split(read, none, out, stamp, dataset="synthetic", split="val")
  assert os.path.getmtime(os.path.join(out, records.INDEX)) == before  # same stamp: reused

  gt_config = common.proposals_config("annotations")
  gt = box_source.eval_source(gt_config, True, "test")
  box_source.prepare_split(read, gt, out, {"reader": "synthetic_cris", **box_source.source_stamp(gt, gt_config)},
                           dataset="synthetic", split="val")
  source = records.SplitSource(out)
  record = source.record(0)
  assert record["proposals"]["source"] == "annotations (ground-truth boxes)"
  assert record["proposals"]["part"]
  for kind in ("object", "part"):  # float32 boxes
    np.testing.assert_allclose(record["proposals"][kind], _gt_boxes(record, kind), rtol=1e-6)


def _pipeline_config(split_dir, tmp_path):
  config = toy_config.get_config("quick")
  config.data.sources = [dict(dir=split_dir, weight=1.0)]
  config.data.toy_tokenizer_prefix = str(tmp_path / "toy_tokenizer")
  config.data.batch_size = 8
  config.data.box_source = "annotations"  # a run trained on ground-truth boxes: what evaluation must not inherit
  return config


def test_eval_pipeline_reads_the_attached_boxes_and_never_falls_back_to_ground_truth(data_dir, tmp_path):
  original = str(tmp_path / "original")
  records.write_split(datasets.DATASETS.lookup("synthetic_cris")(data_dir, "val"), original, num_shards=1)
  none_config = common.proposals_config("none")
  (attached,) = box_source.attach_to_prepared(
      {"val": original}, box_source.eval_source(none_config, False, "test"), none_config, str(tmp_path / "with"),
      "synthetic").values()
  config = _pipeline_config(original, tmp_path)
  pipeline.ensure_toy_tokenizer(config)
  batch = lambda cfg, split_dir: next(iter(pipeline.make_eval_iterator(cfg, split_dir, process_index=0,
                                                                       process_count=1)))
  # The run's own (training) choice reads ground-truth boxes: what evaluation must avoid.
  assert config.data.box_source == "annotations" and batch(config, attached)["object_box_mask"].any()
  eval_config = box_source.eval_run_config(config)
  honest = batch(eval_config, attached)
  assert not honest["object_box_mask"].any() and not honest["part_box_mask"].any()
  assert pipeline.box_source_of(attached, eval_config.data) == "none (no boxes)"
  assert config.data.box_source == "annotations"  # the run config itself is left as it was


def _trainer_config(data_dir, tmp_path, **eval_section):
  split_dir = str(tmp_path / "grefcoco_val")
  if not os.path.exists(split_dir):
    records.write_split(datasets.DATASETS.lookup("synthetic_grefcoco")(data_dir, "val"), split_dir, num_shards=1)
  config = _pipeline_config(split_dir, tmp_path)
  config.evals = {"synthetic/grefcoco": dict(type="grefcoco", dataset="synthetic", splits={"val": split_dir})}
  config.eval_splits = {}
  config.eval = dict(max_new_tokens=4, **eval_section)
  return config, split_dir


def test_trainer_final_evaluation_follows_the_policy(data_dir, tmp_path):
  config, split_dir = _trainer_config(data_dir, tmp_path, proposals=common.proposals_config("annotations"))
  with pytest.raises(provenance.GroundTruthBoxesError, match="config.eval.proposals: the proposal source"):
    loop.trainer_eval_splits(config, str(tmp_path / "run"), 6)

  config, _ = _trainer_config(data_dir, tmp_path)  # no eval.proposals: 'none'
  split_dirs, eval_config, made_with = loop.trainer_eval_splits(config, str(tmp_path / "run"), 6)
  attached = split_dirs["synthetic/grefcoco"]["val"]
  assert attached == str(tmp_path / "run" / "eval" / "proposals" / "synthetic_grefcoco" / "val")
  assert records.SplitSource(attached).record(0)["proposals"]["source"] == "none (no boxes)"
  assert len(records.SplitSource(attached)) == len(records.SplitSource(split_dir))
  assert eval_config.data.box_source == "proposals" and config.data.box_source == "annotations"
  assert pipeline.box_source_of(attached, eval_config.data) == made_with.box_source
  assert made_with == provenance.MadeWith("none (no boxes)", False, "per_sentence",
                                          str(tmp_path / "run" / "checkpoints" / "6"), 6)

  config, _ = _trainer_config(data_dir, tmp_path, proposals=common.proposals_config("annotations"),
                              allow_gt_boxes=True)
  _, _, made_with = loop.trainer_eval_splits(config, str(tmp_path / "run"), 6)
  assert made_with.ground_truth_boxes and made_with.box_source == "annotations (ground-truth boxes)"


def test_training_refuses_a_ground_truth_final_evaluation_before_it_starts(data_dir, tmp_path):
  from unires_jax import run, sharding
  from unires_jax.train import loop as train_loop

  config, _ = _trainer_config(data_dir, tmp_path, proposals=common.proposals_config("annotations"))
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(provenance.GroundTruthBoxesError, match="allow_gt_boxes=True"):
    train_loop.check_config(config, mesh, run.evaluate.check)
  config.eval.allow_gt_boxes = True
  train_loop.check_config(config, mesh, run.evaluate.check)


def test_write_predictions_refuses_ground_truth_before_loading_and_keeps_its_config(data_dir):
  config = synthetic_eval.get_config("val")
  config.checkpoint, config.data_dir = "/nonexistent/run", data_dir
  config.proposals.source = "annotations"
  before = config.to_dict()
  with pytest.raises(provenance.GroundTruthBoxesError, match="allow_gt_boxes=True"):
    checkpoint_eval.write_predictions(config)
  config.allow_gt_boxes = True
  with pytest.raises(FileNotFoundError, match="/nonexistent/run"):  # allowed: it goes on to load the checkpoint
    checkpoint_eval.write_predictions(config)
  assert {**config.to_dict(), "allow_gt_boxes": False} == before


def test_eval_script_prints_the_refusal_as_one_line(data_dir):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "eval.py"), "--config",
       os.path.join(ROOT, "configs", "eval", "synthetic.py") + ":val", "--config.checkpoint=/nonexistent/run",
       f"--config.data_dir={data_dir}", "--config.proposals.source=annotations"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert "eval.py: error: eval config: the proposal source 'annotations (ground-truth boxes)'" in result.stderr
