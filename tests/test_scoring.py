import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.eval import grefcoco as grefcoco_config
from configs.eval import synthetic as synthetic_config
from unires_jax.data import records, synthetic
from unires_jax.data import datasets
from unires_jax.data import transforms
from unires_jax.eval import answers, evaluators, provenance, scoring
from unires_jax.eval import predictions as P

# pycocotools' decoder (under records.ground_truth_mask) warns on numpy 2; the warning is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLITS = ("val", "testA", "testB")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("synthetic")), num_images=12, seed=0)


def _samples(data_dir, reader, split):
  """(record, ref, sentence) of every sample of a split, in record order."""
  out = []
  for record in datasets.DATASETS.lookup(reader)(data_dir, split):
    for ref in record["refs"]:
      for sentence in ref["sentences"]:
        out.append((record, ref, sentence))
  return out


def _write(path, data_dir, reader, splits=SPLITS, mask_fn=records.ground_truth_mask, no_target=None):
  predictions = [P.Prediction.from_mask("synthetic", split, ref["ref_id"], sentence["sent_id"], mask_fn(record, ref),
                                        no_target)
                 for split in splits for record, ref, sentence in _samples(data_dir, reader, split)]
  P.write_predictions(str(path), predictions)
  return predictions


def _score(path, data_dir, reader, evaluator="synthetic", splits=SPLITS, **kwargs):
  return scoring.score_predictions(str(path), dataset="synthetic", splits=list(splits), evaluator=evaluator,
                                   records_fn=scoring.default_records_fn(reader, data_dir), **kwargs)


@pytest.mark.parametrize("reader", ["synthetic_grefcoco", "synthetic_cris", "synthetic_refer"])
def test_ground_truth_as_predictions_scores_100_everywhere(tmp_path, data_dir, reader):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, reader)
  report = _score(path, data_dir, reader)
  for split in SPLITS:
    values = report["splits"][split]["all_metrics"]
    defined = {k: v for k, v in values.items() if not math.isnan(v)}
    assert defined and all(v == pytest.approx(100.0) for v in defined.values()), (split, values)
    assert report["splits"][split]["coverage"]["num_missing"] == 0
  if reader == "synthetic_cris":
    assert report["splits"]["val"]["metrics"]["mIoU/part"] == pytest.approx(100.0)
  if reader == "synthetic_grefcoco":
    assert report["splits"]["val"]["metrics"]["N-acc"] == pytest.approx(100.0)
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["splits"]["val"]["metrics"]["cIoU"] == pytest.approx(100.0)
  assert "| val | 100.00 |" in (tmp_path / "metrics.md").read_text()


def test_all_empty_predictions_give_n_acc_100_and_t_acc_0(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", mask_fn=lambda record, ref: np.zeros(
      (record["height"], record["width"]), bool))
  report = _score(path, data_dir, "synthetic_grefcoco", evaluator="grefcoco")
  for split in SPLITS:
    m = report["splits"][split]["metrics"]
    assert m["N-acc"] == 100.0 and m["T-acc"] == 0.0 and m["cIoU"] == 0.0
    counts = report["splits"][split]["counts"]
    assert m["gIoU"] == pytest.approx(100.0 * counts["no_target"] / counts["samples"])


def test_no_target_flag_overrides_the_mask(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", splits=("val",), no_target=True)  # GT masks, flagged no-target
  m = _score(path, data_dir, "synthetic_grefcoco", evaluator="grefcoco", splits=("val",))["splits"]["val"]["metrics"]
  assert m["N-acc"] == 100.0 and m["T-acc"] == 0.0


def _edit_lines(path, edit):
  lines = path.read_text().splitlines()
  path.write_text("\n".join(edit(lines)) + "\n")
  return [json.loads(line) for line in lines]


def test_missing_duplicate_and_unknown_entries_are_named(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", splits=("val",))
  original = [json.loads(line) for line in path.read_text().splitlines()]
  unknown = dict(original[0], ref_id=999999, sent_id=888888)
  _edit_lines(path, lambda lines: lines[1:] + [lines[2], json.dumps(unknown)])
  gone, doubled = original[0], original[2]
  with pytest.raises(scoring.ScoringError) as error:
    _score(path, data_dir, "synthetic_grefcoco", splits=("val",))
  message = str(error.value)
  assert f"split val: 1 missing (ref_id, sent_id) entries: (ref_id={gone['ref_id']}, sent_id={gone['sent_id']})" \
      in message
  assert f"1 duplicate (ref_id, sent_id) entries: (ref_id={doubled['ref_id']}, sent_id={doubled['sent_id']})" \
      in message
  assert "1 unknown (ref_id, sent_id) entries: (ref_id=999999, sent_id=888888)" in message
  assert not (tmp_path / "metrics.json").exists()  # no score on a subset

  report = _score(path, data_dir, "synthetic_grefcoco", splits=("val",), allow_missing=True)
  coverage = report["splits"]["val"]["coverage"]
  assert (coverage["num_missing"], coverage["num_duplicate"], coverage["num_unknown"]) == (1, 1, 1)
  assert coverage["missing"] == [[gone["ref_id"], gone["sent_id"]]]
  counts = report["splits"]["val"]["counts"]
  assert counts["samples"] == len(original)  # the missing sample is scored (as empty), not dropped


def test_missing_sample_is_scored_as_empty_under_allow_missing(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  preds = _write(path, data_dir, "synthetic_grefcoco", splits=("val",))
  samples = _samples(data_dir, "synthetic_grefcoco", "val")
  targeted = [i for i, (_, ref, _) in enumerate(samples) if ref["ann_ids"]]
  drop = targeted[0]
  P.write_predictions(str(path), [p for i, p in enumerate(preds) if i != drop])
  m = _score(path, data_dir, "synthetic_grefcoco", splits=("val",), allow_missing=True)["splits"]["val"]["metrics"]
  assert m["T-acc"] == pytest.approx(100.0 * (len(targeted) - 1) / len(targeted))


def test_wrong_dataset_and_wrong_mask_size_are_named(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", splits=("val",))

  def rename(lines):
    third = json.loads(lines[2])
    third["dataset"] = "refcoco"
    return lines[:2] + [json.dumps(third)] + lines[3:]

  _edit_lines(path, rename)
  with pytest.raises(scoring.ScoringError, match="line 3: field 'dataset' is 'refcoco', expected 'synthetic'"):
    _score(path, data_dir, "synthetic_grefcoco", splits=("val",))

  _write(path, data_dir, "synthetic_grefcoco", splits=("val",))

  def shrink(lines):
    second = json.loads(lines[1])
    second["mask"] = P.encode_mask(np.zeros((5, 7), bool))
    return [lines[0], json.dumps(second)] + lines[2:]

  _edit_lines(path, shrink)
  with pytest.raises(scoring.ScoringError, match=r"line 2: field 'mask.size' is \[5, 7\]"):
    _score(path, data_dir, "synthetic_grefcoco", splits=("val",))


def test_configs_select_splits_and_name_unknown_ones():
  assert synthetic_config.get_config().splits == ["val", "testA", "testB"]
  assert synthetic_config.get_config("val").splits == ["val"]
  assert grefcoco_config.get_config(":testA,testB").splits == ["testA", "testB"]
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['test'\]"):
    grefcoco_config.get_config("test")
  expected = {"refcoco": ("refcoco", "refcoco", ["val", "testA", "testB"]),
              "refcocoplus": ("refcoco", "refcoco+", ["val", "testA", "testB"]),
              "refcocog": ("refcoco", "refcocog", ["val", "test"]),
              "grefcoco": ("grefcoco", "grefcoco", ["val", "testA", "testB"]),
              "refcocom": ("refcocom", "refcocom", ["val_part_only", "val_object_part", "testA_part_only",
                                                     "testA_object_part", "testB_part_only", "testB_object_part"]),
              "synthetic": ("synthetic", "synthetic", ["val", "testA", "testB"])}
  for name, (evaluator, dataset, splits) in expected.items():
    config = importlib.import_module(f"configs.eval.{name}").get_config()
    assert (config.type, config.dataset, list(config.splits)) == (evaluator, dataset, splits)
    assert config.type in evaluators.EVALUATORS and config.reader in datasets.DATASETS
    assert (config.proposals.source, config.allow_gt_boxes, config.sentence_mode) == ("none", False,
                                                                                      "per_sentence")


# ------------------------------------------------------------------------------------------- the evaluator


class ListSource:
  """An in-memory SampleSource over reader records."""

  def __init__(self, samples):
    self.samples = samples

  def __len__(self):
    return len(self.samples)

  def sample(self, i):
    record, ref, sentence = self.samples[i]
    return {"record": record, "ref": ref, "sentence": sentence,
            "ids": {"dataset": record["dataset"], "split": ref["split"], "ref_id": ref["ref_id"],
                    "sent_id": sentence["sent_id"], "granularity": ref["granularity"]}}


CANVAS = 128  # the synthetic images are 96×128, so the canvas maps 1:1 and the fake model is exact


def _eval_split(data_dir, split, batch_size=4, drop=()):
  source = ListSource(_samples(data_dir, "synthetic_grefcoco", split))

  def batches():
    indices = [i for i in range(len(source)) if i not in drop]
    indices += [-1] * (-len(indices) % batch_size)  # padding rows, as the pipeline marks them
    for start in range(0, len(indices), batch_size):
      yield {"sample_index": np.asarray(indices[start:start + batch_size], np.int32)}

  return evaluators.EvalSplit(split, source, batches), source


def _oracle(source, has_seg_fn=lambda ref: bool(ref["ann_ids"])):
  """A predict_fn that returns ±10 logits of the ground truth on the canvas."""
  def predict_fn(params, batch):
    assert params == "params"
    logits, has_seg = [], []
    for i in batch["sample_index"]:
      if i < 0:
        logits.append(np.full((CANVAS, CANVAS), -10.0, np.float32))
        has_seg.append(False)
        continue
      sample = source.sample(int(i))
      canvas = transforms.resize_mask(records.ground_truth_mask(sample["record"], sample["ref"]), CANVAS)
      logits.append(np.where(canvas > 0, 10.0, -10.0).astype(np.float32))
      has_seg.append(has_seg_fn(sample["ref"]))
    return {"mask_logits": np.stack(logits), "has_seg": np.asarray(has_seg)}
  return predict_fn


def test_evaluator_with_an_oracle_scores_100_and_writes_its_files(tmp_path, data_dir):
  split, source = _eval_split(data_dir, "val")
  evaluator = evaluators.EVALUATORS.lookup("grefcoco")(
      _oracle(source), [split], dataset="synthetic", output_dir=str(tmp_path), process_index=0, process_count=1)
  results = dict(evaluator.run("params"))
  assert results == {"val/cIoU": 100.0, "val/gIoU": 100.0, "val/N-acc": 100.0, "val/T-acc": 100.0}
  assert json.loads((tmp_path / "metrics.json").read_text())["splits"]["val"]["metrics"]["gIoU"] == 100.0
  assert "| val | 100.00 | 100.00 | 100.00 | 100.00 |" in (tmp_path / "metrics.md").read_text()
  written = P.read_predictions(str(tmp_path / "predictions.jsonl"))
  assert len(written) == len(source)
  # The written predictions re-score offline to the same numbers.
  report = _score(tmp_path / "predictions.jsonl", data_dir, "synthetic_grefcoco", evaluator="grefcoco",
                  splits=("val",), output_dir=str(tmp_path / "rescored"))
  assert report["splits"]["val"]["metrics"] == results_without_prefix(results)


def results_without_prefix(results):
  return {k.split("/", 1)[1]: v for k, v in results.items()}


def test_evaluator_with_no_segmentation_gives_n_acc_100_t_acc_0(data_dir):
  split, source = _eval_split(data_dir, "val")
  evaluator = evaluators.EVALUATORS.lookup("synthetic")(
      _oracle(source, has_seg_fn=lambda ref: False), [split], dataset="synthetic", process_index=0,
      process_count=1)
  results = dict(evaluator.run("params"))
  assert results["val/N-acc"] == 100.0 and results["val/T-acc"] == 0.0 and results["val/mIoU"] == 0.0


def test_evaluator_names_missing_samples(data_dir):
  split, source = _eval_split(data_dir, "val", drop=(1,))
  ref_id, sent_id = source.sample(1)["ids"]["ref_id"], source.sample(1)["ids"]["sent_id"]
  make = evaluators.EVALUATORS.lookup("grefcoco")
  with pytest.raises(ValueError, match=rf"1 of {len(source)} samples were never predicted: "
                                       rf"\(ref_id={ref_id}, sent_id={sent_id}\)"):
    list(make(_oracle(source), [split], dataset="synthetic", process_index=0, process_count=1).run("params"))
  results = dict(make(_oracle(source), [split], dataset="synthetic", allow_missing=True, process_index=0,
                      process_count=1).run("params"))
  assert results["val/cIoU"] < 100.0  # the missing targeted sample counts as an empty prediction


def test_refcocom_evaluator_reports_part_and_obj_part_miou():
  metrics = evaluators.metrics_lib.RESMetrics()
  metrics.update_from_counts(1, 2, False, True, "part")    # IoU 0.5
  metrics.update_from_counts(3, 3, False, True, "object")  # IoU 1
  summary = evaluators.EVALUATORS.lookup("refcocom").summarize(metrics)
  assert summary == {"mIoU/part": 50.0, "mIoU/obj&part": 75.0, "cIoU": pytest.approx(80.0)}


def test_eval_script_scores_a_file(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", splits=("val",))
  out = tmp_path / "report"
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "eval.py"), "--config",
       os.path.join(ROOT, "configs", "eval", "synthetic.py") + ":val", f"--config.predictions={path}",
       f"--config.data_dir={data_dir}", f"--config.output_dir={out}"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "| val | 100.00 |" in result.stdout
  assert json.loads((out / "metrics.json").read_text())["splits"]["val"]["metrics"]["cIoU"] == 100.0


# ------------------------------------------------------------------------ provenance, box policy, answers


GT_MADE_WITH = provenance.MadeWith(box_source="annotations (ground-truth boxes)", ground_truth_boxes=True,
                                   checkpoint="/runs/x/checkpoints/3", step=3)


def test_predictions_made_with_ground_truth_boxes_are_refused_unless_allowed(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", splits=("val",))
  provenance.write_sidecar(str(path), GT_MADE_WITH)
  assert (tmp_path / "predictions.meta.json").exists()
  with pytest.raises(provenance.GroundTruthBoxesError, match="ground-truth boxes.*allow_gt_boxes=True"):
    _score(path, data_dir, "synthetic_grefcoco", splits=("val",))
  assert not (tmp_path / "metrics.json").exists()
  report = _score(path, data_dir, "synthetic_grefcoco", splits=("val",), allow_gt_boxes=True)
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["made_with"] == {**GT_MADE_WITH.to_json(), "warning": provenance.GROUND_TRUTH_WARNING}
  assert written["made_with"]["warning"].startswith("ground-truth boxes:")
  markdown = (tmp_path / "metrics.md").read_text()
  assert markdown.startswith("> **GROUND-TRUTH BOXES** (annotations (ground-truth boxes))")
  assert "checkpoint /runs/x/checkpoints/3, step 3" in markdown and report["table"] == markdown


def test_predictions_without_sidecar_say_their_making_is_unknown(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", splits=("val",))
  _score(path, data_dir, "synthetic_grefcoco", splits=("val",))
  made_with = json.loads((tmp_path / "metrics.json").read_text())["made_with"]
  assert made_with["box_source"] == "unknown (no predictions.meta.json beside the predictions)"
  assert (made_with["sentence_mode"], made_with["iou_resolution"], made_with["step"]) == ("per_sentence",
                                                                                          "original", None)
  assert (tmp_path / "metrics.md").read_text().startswith("Made with: boxes unknown (no predictions.meta.json")


def test_merged_sentence_mode_is_refused_clearly(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  _write(path, data_dir, "synthetic_grefcoco", splits=("val",))
  with pytest.raises(provenance.ProvenanceError, match="sentence_mode 'merged' .* is not implemented"):
    _score(path, data_dir, "synthetic_grefcoco", splits=("val",), sentence_mode="merged")
  config = synthetic_config.get_config("val")
  config.predictions, config.data_dir, config.sentence_mode = str(path), data_dir, "merged"
  with pytest.raises(provenance.ProvenanceError, match="use sentence_mode='per_sentence'"):
    scoring.score_from_config(config)


def test_invalid_lines_are_counted_and_scored_empty(tmp_path, data_dir):
  path = tmp_path / "predictions.jsonl"
  samples = _samples(data_dir, "synthetic_grefcoco", "val")
  targeted = [i for i, (_, ref, _) in enumerate(samples) if ref["ann_ids"]]
  flagged = set(targeted[:2])
  P.write_predictions(str(path), [
      P.Prediction.from_mask("synthetic", "val", ref["ref_id"], sentence["sent_id"],
                             records.ground_truth_mask(record, ref), invalid=i in flagged)
      for i, (record, ref, sentence) in enumerate(samples)])
  report = _score(path, data_dir, "synthetic_grefcoco", evaluator="grefcoco", splits=("val",))
  assert report["splits"]["val"]["invalid"] == 2
  assert report["splits"]["val"]["metrics"]["T-acc"] == pytest.approx(100.0 * (len(targeted) - 2) / len(targeted))
  assert "| split | cIoU | gIoU | N-acc | T-acc | invalid answers |" in report["table"]
  assert "| 2 |" in report["table"]


class WordTokenizer:
  """decode: ids → words of WORDS; id 0 ends the answer."""
  eos_id = 0
  WORDS = ["</s>", "Sorry,", "there", "is", "no", "such", "target", "in", "this", "image.", "banana", "[SEG]"]

  def decode(self, ids):
    return " ".join(self.WORDS[i] for i in ids)


NO_TARGET_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # "Sorry, there is no such target in this image." </s>
GARBAGE_IDS = [10, 10, 10, 0, 0, 0, 0, 0, 0, 0]
SEG_IDS = [11, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def test_evaluator_counts_invalid_answers_and_writes_how_it_was_made(tmp_path, data_dir):
  split, source = _eval_split(data_dir, "val")
  oracle = _oracle(source)
  no_target = [i for i in range(len(source)) if not source.sample(i)["ref"]["ann_ids"]]
  assert len(no_target) >= 2
  garbage = {no_target[0]}  # one no-target sample answers garbage, the others the no-target answer
  expected_invalid = len(garbage)

  def predict_fn(params, batch):
    outputs = oracle(params, batch)
    tokens = []
    for i, seg in zip(batch["sample_index"], outputs["has_seg"]):
      tokens.append(SEG_IDS if seg else GARBAGE_IDS if i in garbage else NO_TARGET_IDS)
    return {**outputs, "tokens": np.asarray(tokens, np.int32)}

  parser = answers.AnswerParser(WordTokenizer(), ("Sorry, there is no such target in this image.",
                                                  "There is no {phrase} in this image."))
  made_with = provenance.MadeWith(box_source="none (no boxes)", ground_truth_boxes=False,
                                  checkpoint="/run/checkpoints/6", step=6)
  evaluator = evaluators.EVALUATORS.lookup("grefcoco")(
      predict_fn, [split], dataset="synthetic", output_dir=str(tmp_path), process_index=0, process_count=1,
      made_with=made_with, answer_parser=parser)
  results = dict(evaluator.run("params"))
  assert results["val/invalid"] == expected_invalid
  assert results["val/N-acc"] == 100.0  # invalid answers are scored as empty masks
  report = json.loads((tmp_path / "metrics.json").read_text())
  assert report["splits"]["val"]["answers"] == {"target": len(source) - len(no_target),
                                                "no-target": len(no_target) - expected_invalid,
                                                "invalid": expected_invalid}
  assert report["made_with"] == made_with.to_json() and "warning" not in report["made_with"]
  assert provenance.read_sidecar(str(tmp_path / "predictions.jsonl")) == made_with
  markdown = (tmp_path / "metrics.md").read_text()
  assert markdown.startswith("Made with: boxes none (no boxes); one sample per sentence; IoU at the original image "
                             "resolution; checkpoint /run/checkpoints/6, step 6.")
  lines = P.read_predictions(str(tmp_path / "predictions.jsonl"))
  assert sum(bool(p.invalid) for p in lines) == expected_invalid and all(p.invalid is not None for p in lines)
  # Offline re-scoring reads the same provenance and the same count back.
  rescored = _score(tmp_path / "predictions.jsonl", data_dir, "synthetic_grefcoco", evaluator="grefcoco",
                    splits=("val",), output_dir=str(tmp_path / "rescored"))
  assert rescored["splits"]["val"]["invalid"] == expected_invalid
  assert rescored["made_with"] == made_with.to_json()


def test_answer_parser_definition():
  parser = answers.AnswerParser(WordTokenizer(), ("Sorry, there is no such target in this image.",
                                                  "There is no {phrase} in this image."))
  assert parser.kind("It is [SEG].", True, "the cat") == answers.TARGET
  assert parser.kind("sorry,  there is no such TARGET in this image.", False, "x") == answers.NO_TARGET
  assert parser.kind("There is no the red robot in this image.", False, " the red robot ") == answers.NO_TARGET
  assert parser.kind("There is no the red robot in this image.", False, "the blue robot") == answers.INVALID
  assert parser.kind("Sorry, there is no such target", False, "x") == answers.INVALID  # cut by the token limit
  assert parser.kind("It is [SEG].", False, "x") == answers.INVALID  # text reading [SEG] is not the token
  assert parser.text(np.asarray(NO_TARGET_IDS)) == "Sorry, there is no such target in this image."
