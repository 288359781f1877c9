"""Benchmark evaluation's box policy: ground-truth boxes refused unless allowed, proposals attached when a split is
prepared (and reused), the pipeline reading exactly those, and the trainer's final evaluation following the same
rule before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import configs.toy as toy_config
from configs import common
from configs.eval import synthetic as synthetic_eval
from unires_jax.data import pipeline, records, synthetic
from unires_jax.data import datasets
from unires_jax.eval import box_source, checkpoint_eval, provenance

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
    box_source.check_policy(annotations, False, "config.evals[name].proposals")
  assert box_source.eval_source(annotations, True, "eval config").is_ground_truth
  box_source.check_policy(annotations, True, "config.evals[name].proposals")
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
  entry = synthetic_eval.get_config("val")
  entry.update(reader="synthetic_cris", data_dir=data_dir)
  (attached,) = box_source.prepare_benchmark_splits(
      entry, str(tmp_path / "with"), box_source.eval_source(entry.proposals, False, "test")).values()
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


def _trainer_config(data_dir, tmp_path, **entry_fields):
  split_dir = str(tmp_path / "grefcoco_val")
  if not os.path.exists(split_dir):
    records.write_split(datasets.DATASETS.lookup("synthetic_grefcoco")(data_dir, "val"), split_dir, num_shards=1)
  config = _pipeline_config(split_dir, tmp_path)
  config.generation.max_new_tokens = 4
  entry = synthetic_eval.get_config("val")
  entry.update(type="grefcoco", data_dir=data_dir, **entry_fields)
  config.evals = {"synthetic/grefcoco": entry}
  return config, split_dir


class _NoModel:
  """What `trainer_evals.build` may touch of the model before it evaluates: nothing."""


def test_trainer_evaluations_follow_the_policy_and_are_built_once(data_dir, tmp_path, monkeypatch):
  from unires_jax import sharding
  from unires_jax.eval import trainer_evals

  config, split_dir = _trainer_config(data_dir, tmp_path, proposals=common.proposals_config("annotations"))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  pipeline.ensure_toy_tokenizer(config)
  with pytest.raises(provenance.GroundTruthBoxesError,
                     match=r"config.evals\['synthetic/grefcoco'\].proposals: the proposal source"):
    trainer_evals.build(config, _NoModel(), lambda p: p, mesh, rules, str(tmp_path / "run"))

  # The predict function is made once for every entry and every evaluation (stubbed: no model runs here).
  made, runs = [], []

  def fake_predict_fn(model, run_config, *args):
    made.append(run_config.data.box_source)
    return lambda params, batch: runs.append(batch["sample_index"]) or {
        "mask_logits": np.zeros((len(batch["sample_index"]), 8, 8), np.float32),
        "has_seg": np.zeros(len(batch["sample_index"]), bool),
        "tokens": np.zeros((len(batch["sample_index"]), 1), np.int32)}

  monkeypatch.setattr(trainer_evals, "make_predict_fn", fake_predict_fn)
  config, _ = _trainer_config(data_dir, tmp_path)  # the schema's default source: 'none'
  config.evals["again"] = config.evals["synthetic/grefcoco"]
  workdir = tmp_path / "run"
  evaluate = trainer_evals.build(config, _NoModel(), lambda p: p, mesh, rules, str(workdir))
  attached = workdir / "eval" / "prepared" / "synthetic_grefcoco" / "val"
  assert records.SplitSource(str(attached)).record(0)["proposals"]["source"] == "none (no boxes)"
  assert len(records.SplitSource(str(attached))) == len(records.SplitSource(split_dir))
  assert made == ["proposals"] and config.data.box_source == "annotations"
  assert evaluate(None, 3) == {} and not runs  # not final, no generate_every_eval, no heldout_loss: nothing runs
  for step in (6, 9):
    results = evaluate(None, step, final=True)
    report = json.loads((workdir / "eval" / f"step_{step}" / "synthetic_grefcoco" / "metrics.json").read_text())
    assert report["made_with"]["box_source"] == "none (no boxes)" and report["made_with"]["step"] == step
    assert report["made_with"]["checkpoint"] == str(workdir / "checkpoints" / str(step))
    assert results["eval/synthetic/grefcoco"]["val/N-acc"] == results["eval/again"]["val/N-acc"]
  assert made == ["proposals"] and runs  # one predict function, run by every final evaluation
  assert (workdir / "eval" / "step_9" / "again" / "baselines.json").exists()

  config, _ = _trainer_config(data_dir, tmp_path, proposals=common.proposals_config("annotations"),
                              allow_gt_boxes=True)
  trainer_evals.build(config, _NoModel(), lambda p: p, mesh, rules, str(tmp_path / "gt_run"))(None, 1, final=True)
  report = json.loads((tmp_path / "gt_run" / "eval" / "step_1" / "synthetic_grefcoco" / "metrics.json").read_text())
  assert report["made_with"]["ground_truth_boxes"]
  assert report["made_with"]["box_source"] == "annotations (ground-truth boxes)"


def test_training_refuses_a_ground_truth_final_evaluation_before_it_starts(data_dir, tmp_path):
  from unires_jax import run, sharding
  from unires_jax.train import loop as train_loop

  config, _ = _trainer_config(data_dir, tmp_path, proposals=common.proposals_config("annotations"))
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(provenance.GroundTruthBoxesError, match="allow_gt_boxes=True"):
    train_loop.check_config(config, mesh, run.make_evaluate.check)
  config.evals["synthetic/grefcoco"].allow_gt_boxes = True
  train_loop.check_config(config, mesh, run.make_evaluate.check)


@pytest.mark.parametrize("change, error, match", [
    (lambda c: c.update(eval_splits={}), KeyError, r"config.eval_splits is no longer read: use "
                                                   r"config.evals\[name\].heldout_loss=True"),
    (lambda c: c.update(eval=dict(max_new_tokens=4)), KeyError, r"config.eval is no longer read"),
    (lambda c: c.evals["synthetic/grefcoco"].update(data_dir="/nonexistent/bench"), FileNotFoundError,
     r"config.evals\['synthetic/grefcoco'\].data_dir '/nonexistent/bench' does not exist"),
    (lambda c: c.evals["synthetic/grefcoco"].update(checkpoint="/some/run"), ValueError,
     r"config.evals\['synthetic/grefcoco'\].checkpoint is '/some/run': the trainer evaluates its own params"),
    (lambda c: c.evals["synthetic/grefcoco"].update(reader="no_such_layout"), KeyError, "no_such_layout"),
    (lambda c: c.evals["synthetic/grefcoco"].update(type="no_such_evaluator"), KeyError, "no_such_evaluator"),
    (lambda c: c.evals["synthetic/grefcoco"].update(sentence_mode="merged"), provenance.ProvenanceError, "merged"),
])
def test_trainer_evaluation_config_errors_name_the_key(data_dir, tmp_path, change, error, match):
  from unires_jax.eval import trainer_evals

  config, _ = _trainer_config(data_dir, tmp_path)
  change(config)
  with pytest.raises(error, match=match):
    trainer_evals.check(config)


def test_eval_config_schema_refuses_unknown_keys():
  from configs.eval import base

  with pytest.raises(KeyError, match=r"unknown key\(s\) \['heldout'\]"):
    base.eval_config(evaluator="synthetic", dataset="synthetic", reader="synthetic_cris", splits=["val"],
                     heldout=True)
  entry = base.eval_config(evaluator="synthetic", dataset="synthetic", reader="synthetic_cris", splits=["val"],
                           heldout_loss=True, data_dir="/d")
  assert entry.heldout_loss and entry.data_dir == "/d" and entry.proposals.source == "none"


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
