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
from unires_jax.data import readers, records, synthetic
from unires_jax.data import transforms
from unires_jax.eval import evaluators, scoring
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
  for record in readers.DATASETS.lookup(reader)(data_dir, split):
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
              "refcocom": ("refcocom", "refcocom", ["val", "testA", "testB"]),
              "synthetic": ("synthetic", "synthetic", ["val", "testA", "testB"])}
  for name, (evaluator, dataset, splits) in expected.items():
    config = importlib.import_module(f"configs.eval.{name}").get_config()
    assert (config.type, config.dataset, list(config.splits)) == (evaluator, dataset, splits)
    assert config.type in evaluators.EVALUATORS and config.reader in readers.DATASETS


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
