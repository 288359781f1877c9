import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from pycocotools import mask as mask_utils

from unires_jax.eval import predictions as P


def _random_mask(rng, h, w, density):
  return rng.random((h, w)) < density


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_rle_round_trip_is_exact_and_matches_pycocotools(h, w, density, seed):
  mask = _random_mask(np.random.default_rng(seed), h, w, density)
  rle = P.encode_mask(mask)
  assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
  np.testing.assert_array_equal(P.decode_mask(rle), mask)
  reference = mask_utils.decode({"size": [h, w], "counts": rle["counts"].encode()}).astype(bool)
  np.testing.assert_array_equal(reference, mask)
  assert P.rle_area(rle) == int(mask.sum())


def test_run_lengths_match_a_hand_computed_mask():
  # Column-major runs of [[0, 1], [1, 1], [0, 0]]: flat (col 0 then col 1) 0 1 0 | 1 1 0 → runs 1,1,1,2,1.
  mask = np.array([[0, 1], [1, 1], [0, 0]], bool)
  np.testing.assert_array_equal(P.rle_counts(P.encode_mask(mask)["counts"]), [1, 1, 1, 2, 1])
  # Large run lengths need several characters and negative deltas; a 300×500 mask with a block in it.
  big = np.zeros((300, 500), bool)
  big[10:290, 3:400] = True
  assert P.rle_area(P.encode_mask(big)) == 280 * 397


def test_malformed_counts_are_rejected_before_decoding():
  with pytest.raises(ValueError, match="sum to"):
    P.decode_mask({"size": [3, 4], "counts": "71"})  # 7 + 1 = 8 ≠ 12
  with pytest.raises(ValueError, match="middle of a number"):
    P.rle_counts("7P")  # 'P' - 48 = 32: a continuation bit with nothing after it
  with pytest.raises(ValueError, match="outside"):
    P.rle_counts("7 4")
  with pytest.raises(ValueError, match="empty"):
    P.rle_counts("")


def _prediction(ref_id, sent_id, mask, no_target=None, split="val"):
  return P.Prediction.from_mask("synthetic", split, ref_id, sent_id, mask, no_target)


def test_predictions_file_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  preds = [_prediction(1, 10, _random_mask(rng, 30, 20, 0.3)),
           _prediction(1, 11, np.zeros((30, 20), bool), no_target=True),
           _prediction(2, 12, _random_mask(rng, 17, 9, 0.6), no_target=False)]
  path = str(tmp_path / "out" / "predictions.jsonl")
  assert P.write_predictions(path, preds) == 3
  back = P.read_predictions(path)
  assert back == preds
  for original, read in zip(preds, back):
    np.testing.assert_array_equal(read.predicted_mask(), original.predicted_mask())
  lines = open(path).read().splitlines()
  assert "no_target" not in json.loads(lines[0]) and json.loads(lines[1])["no_target"] is True


def test_no_target_flag_empties_the_mask():
  full = np.ones((4, 4), bool)
  assert not _prediction(1, 1, full, no_target=True).predicted_mask().any()
  assert _prediction(1, 1, full, no_target=False).predicted_mask().all()
  assert _prediction(1, 1, full).predicted_mask().all()


def test_invalid_answer_flag_empties_the_mask_and_round_trips(tmp_path):
  full = np.ones((4, 4), bool)
  invalid = P.Prediction.from_mask("synthetic", "val", 1, 2, full, no_target=True, invalid=True)
  assert not invalid.predicted_mask().any()
  assert not P.Prediction.from_mask("synthetic", "val", 1, 2, full, invalid=True).predicted_mask().any()
  assert P.Prediction.from_mask("synthetic", "val", 1, 2, full, invalid=False).predicted_mask().all()
  path = str(tmp_path / "predictions.jsonl")
  P.write_predictions(path, [invalid, _prediction(1, 3, full)])
  lines = [json.loads(line) for line in open(path)]
  assert lines[0]["invalid"] is True and "invalid" not in lines[1]
  assert P.read_predictions(path)[0] == invalid


def test_writer_leaves_no_file_on_error(tmp_path):
  path = tmp_path / "predictions.jsonl"
  with pytest.raises(RuntimeError):
    with P.PredictionsWriter(str(path)) as writer:
      writer.write(_prediction(1, 1, np.ones((2, 2), bool)))
      raise RuntimeError("interrupted")
  assert list(tmp_path.iterdir()) == []


GOOD = {"dataset": "synthetic", "split": "val", "ref_id": 3, "sent_id": 7, "mask": {"size": [3, 4], "counts": "714"}}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("sent_id"), "field 'sent_id' missing"),
    (lambda d: d.update(ref_id="3"), "field 'ref_id' must be an integer"),
    (lambda d: d.update(ref_id=True), "field 'ref_id' must be an integer"),
    (lambda d: d.update(split=""), "field 'split' must be a non-empty string"),
    (lambda d: d.update(no_target="yes"), "field 'no_target' must be true or false"),
    (lambda d: d.update(invalid=1), "field 'invalid' must be true or false"),
    (lambda d: d.update(score=0.5), r"unknown field\(s\) \['score'\]"),
    (lambda d: d.update(mask={"size": [3, 4]}), "field 'mask' must be an object"),
    (lambda d: d.update(mask={"size": [3, 0], "counts": "714"}), "field 'mask.size'"),
    (lambda d: d.update(mask={"size": [3, 4], "counts": [7, 1, 4]}), "field 'mask.counts' must be"),
    (lambda d: d.update(mask={"size": [3, 5], "counts": "714"}), "field 'mask.counts' covers 12 pixels"),
    (lambda d: d.update(mask={"size": [3, 4], "counts": "7P"}), "field 'mask.counts': RLE counts end"),
])
def test_bad_lines_are_named_by_line_number_and_field(tmp_path, change, message):
  bad = json.loads(json.dumps(GOOD))
  change(bad)
  path = tmp_path / "predictions.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
  with pytest.raises(P.PredictionsError, match=f"line 3: {message}"):
    P.read_predictions(str(path))


def test_invalid_json_and_missing_file_are_named(tmp_path):
  path = tmp_path / "predictions.jsonl"
  path.write_text(json.dumps(GOOD) + "\n{not json\n")
  with pytest.raises(P.PredictionsError, match="line 2: not valid JSON"):
    P.read_predictions(str(path))
  path.write_text("[1, 2]\n")
  with pytest.raises(P.PredictionsError, match="line 1: expected a JSON object"):
    P.read_predictions(str(path))
  with pytest.raises(FileNotFoundError, match="predictions file"):
    P.read_predictions(str(tmp_path / "absent.jsonl"))


def test_good_line_decodes_to_the_hand_written_mask():
  prediction = P.parse_line(json.dumps(GOOD), "here")
  expected = np.zeros((3, 4), bool)
  expected[1, 2] = True  # runs 7, 1, 4 column-major: pixel 7 = column 2, row 1
  np.testing.assert_array_equal(prediction.predicted_mask(), expected)
  assert prediction.key == (3, 7)
