import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from unires_jax.eval import metrics as M


def _mask(h, w, *boxes):
  mask = np.zeros((h, w), bool)
  for y0, y1, x0, x1 in boxes:
    mask[y0:y1, x0:x1] = True
  return mask


def test_intersection_union_hand_computed():
  pred = _mask(4, 4, (0, 2, 0, 2))  # 4 pixels
  gt = _mask(4, 4, (1, 3, 1, 3))    # 4 pixels, 1 shared
  assert M.intersection_union(pred, gt) == (1, 7)
  with pytest.raises(ValueError, match="shape"):
    M.intersection_union(pred, np.zeros((3, 4), bool))


def test_every_branch_hand_computed():
  m = M.RESMetrics()
  empty = np.zeros((4, 5), bool)
  # 1. exact match on an object: I = U = 6.
  gt1 = _mask(4, 5, (0, 2, 0, 3))
  m.update(gt1, gt1, True, "object")
  # 2. partial overlap on a part: pred 4 px, gt 9 px, I = 2 → U = 11.
  pred2 = _mask(4, 5, (0, 2, 2, 4))  # rows 0-1, columns 2-3
  gt2 = _mask(4, 5, (0, 3, 0, 3))    # rows 0-2, columns 0-2: shares (0, 2) and (1, 2)
  assert M.intersection_union(pred2, gt2) == (2, 11)
  m.update(pred2, gt2, True, "part")
  # 3. targeted sample predicted empty: I = 0, U = |gt| = 3.
  gt3 = _mask(4, 5, (3, 4, 0, 3))
  m.update(empty, gt3, True, "multi-object")
  # 4. no-target predicted empty: adds nothing to cIoU, scores 1 in gIoU.
  m.update(empty, empty, False, "no-target")
  # 5. no-target predicted non-empty (2 px): adds U = 2 to cIoU, scores 0 in gIoU.
  m.update(_mask(4, 5, (3, 4, 3, 5)), empty, False, "no-target")

  r = m.result()
  assert r["cIoU"] == pytest.approx(100 * (6 + 2 + 0) / (6 + 11 + 3 + 0 + 2))
  assert r["mIoU"] == pytest.approx(100 * (1 + 2 / 11 + 0) / 3)
  assert r["gIoU"] == pytest.approx(100 * (1 + 2 / 11 + 0 + 1 + 0) / 5)
  assert r["N-acc"] == pytest.approx(50.0)
  assert r["T-acc"] == pytest.approx(100 * 2 / 3)
  for k in (5, 6, 7, 8, 9):  # only the exact match passes any threshold (2/11 < 0.5)
    assert r[f"Pr@0.{k}"] == pytest.approx(100 / 3)
  # Per-granularity breakdowns.
  assert r["mIoU/object"] == pytest.approx(100.0)
  assert r["mIoU/part"] == pytest.approx(100 * 2 / 11)
  assert r["cIoU/multi-object"] == 0.0 and r["T-acc/multi-object"] == 0.0
  assert r["N-acc/no-target"] == pytest.approx(50.0) and r["gIoU/no-target"] == pytest.approx(50.0)
  assert r["cIoU/no-target"] == 0.0  # ΣI = 0 over ΣU = 2
  assert math.isnan(r["mIoU/no-target"]) and math.isnan(r["N-acc/object"])
  assert m.sample_counts() == {"samples": 5, "targeted": 3, "no_target": 2, "samples/object": 1,
                               "samples/multi-object": 1, "samples/part": 1, "samples/no-target": 2}


def test_precision_thresholds_are_inclusive_and_exact():
  m = M.RESMetrics()
  # IoU exactly 0.5, 0.6, 0.7, 0.8, 0.9 (I/U = k/10): each passes its own threshold and all below it.
  for k in (5, 6, 7, 8, 9):
    m.update_from_counts(k, 10, pred_empty=False, has_target=True, granularity="object")
  r = m.result()
  for i, k in enumerate((5, 6, 7, 8, 9)):
    assert r[f"Pr@0.{k}"] == pytest.approx(100 * (5 - i) / 5)


def test_zero_samples_report_nan_and_no_breakdowns():
  r = M.RESMetrics().result()
  assert all(math.isnan(v) for v in r.values())
  assert not any("/" in k for k in r)
  only_no_target = M.RESMetrics()
  only_no_target.update(np.zeros((2, 2), bool), np.zeros((2, 2), bool), False, "no-target")
  r = only_no_target.result()
  assert math.isnan(r["cIoU"]) and math.isnan(r["mIoU"]) and math.isnan(r["T-acc"])
  assert r["gIoU"] == 100.0 and r["N-acc"] == 100.0
  assert "mIoU/object" not in r


def test_invalid_inputs_are_named():
  m = M.RESMetrics()
  with pytest.raises(ValueError, match="granularity 'stuff'"):
    m.update_from_counts(1, 2, False, True, "stuff")
  with pytest.raises(ValueError, match="contradicts"):
    m.update_from_counts(1, 2, False, False, "object")
  with pytest.raises(ValueError, match="no-target sample must have an empty ground-truth"):
    m.update(np.zeros((2, 2), bool), np.ones((2, 2), bool), False, "no-target")
  with pytest.raises(ValueError, match="intersection <= union"):
    m.update_from_counts(3, 2, False, True, "object")


def _reference(samples):
  """cIoU and gIoU straight from the PAPER.md definitions."""
  total_i = total_u = 0
  scores = []
  for pred, gt, has_target in samples:
    i = np.logical_and(pred, gt).sum()
    u = np.logical_or(pred, gt).sum()
    if has_target:
      total_i += i
      total_u += u
      scores.append(0.0 if not pred.any() else i / u)
    else:
      total_u += 0 if not pred.any() else pred.sum()
      scores.append(1.0 if not pred.any() else 0.0)
  ciou = total_i / total_u if total_u else math.nan
  return 100 * ciou, 100 * float(np.mean(scores))


@st.composite
def _samples(draw):
  n = draw(st.integers(1, 8))
  h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
  out = []
  for _ in range(n):
    has_target = draw(st.booleans())
    bits = st.lists(st.booleans(), min_size=h * w, max_size=h * w)
    pred = np.array(draw(bits), bool).reshape(h, w)
    gt = np.array(draw(bits), bool).reshape(h, w) if has_target else np.zeros((h, w), bool)
    out.append((pred, gt, has_target))
  return out


@settings(max_examples=200, deadline=None)
@given(_samples())
def test_ciou_and_giou_match_the_definitions(samples):
  m = M.RESMetrics()
  for pred, gt, has_target in samples:
    m.update(pred, gt, has_target, "object" if has_target else "no-target")
  ciou, giou = _reference(samples)
  r = m.result()
  if math.isnan(ciou):
    assert math.isnan(r["cIoU"])
  else:
    assert r["cIoU"] == pytest.approx(ciou)
  assert r["gIoU"] == pytest.approx(giou)


def _random_metrics(rng, n, granularities=("object", "part", "multi-object", "no-target")):
  m = M.RESMetrics()
  for _ in range(n):
    g = granularities[rng.integers(len(granularities))]
    has_target = g != "no-target"
    pred = rng.random((7, 9)) < rng.random()
    gt = (rng.random((7, 9)) < 0.4) if has_target else np.zeros((7, 9), bool)
    m.update(pred, gt, has_target, g)
  return m


def test_merging_two_accumulators_equals_one_over_all():
  rng = np.random.default_rng(3)
  samples = []
  for i in range(50):
    g = ("object", "part", "no-target")[i % 3]
    pred = rng.random((5, 6)) < 0.5
    gt = (rng.random((5, 6)) < 0.5) if g != "no-target" else np.zeros((5, 6), bool)
    samples.append((pred, gt, g != "no-target", g))
  single, first, second = M.RESMetrics(), M.RESMetrics(), M.RESMetrics()
  for i, sample in enumerate(samples):
    single.update(*sample)
    (first if i < 20 else second).update(*sample)
  merged = first.merge(second)
  np.testing.assert_array_equal(merged.counts, single.counts)
  for key, value in single.result().items():
    assert merged.result()[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key


def test_arrays_round_trip_and_allreduce_is_exact():
  a = _random_metrics(np.random.default_rng(4), 25)
  b = _random_metrics(np.random.default_rng(5), 25)
  counts, sums = a.to_arrays()
  back = M.RESMetrics.from_arrays(counts, sums)
  np.testing.assert_array_equal(back.counts, a.counts)
  np.testing.assert_array_equal(back.sums, a.sums)
  with pytest.raises(ValueError, match="RESMetrics arrays"):
    M.RESMetrics.from_arrays(counts[:2], sums)

  assert M.allreduce(a, process_count=1) is a
  # Two "processes": a fake allgather stacks both processes' uint32 words, as process_allgather would.
  a_words = {"counts": a.counts.view(np.uint32), "sums": a.sums.view(np.uint32)}
  b_words = {"counts": b.counts.view(np.uint32), "sums": b.sums.view(np.uint32)}

  def fake_allgather(tree):
    assert tree["counts"].dtype == np.uint32  # what crosses processes is 32-bit, so nothing is narrowed
    return {k: np.stack([a_words[k], b_words[k]]) for k in tree}

  reduced = M.allreduce(a, allgather=fake_allgather, process_count=2)
  expected = M.merge_all([a, b])
  np.testing.assert_array_equal(reduced.counts, expected.counts)
  np.testing.assert_array_equal(reduced.sums, expected.sums)


def test_large_counts_survive_allreduce_without_narrowing():
  big = M.RESMetrics()
  big.update_from_counts(3 * 2**40, 5 * 2**40, pred_empty=False, has_target=True, granularity="object")
  words = {"counts": big.counts.view(np.uint32), "sums": big.sums.view(np.uint32)}
  reduced = M.allreduce(big, allgather=lambda t: {k: np.stack([words[k], words[k]]) for k in t}, process_count=2)
  assert reduced.counts[0, M.COUNT_FIELDS.index("union")] == 10 * 2**40
  assert reduced.result()["cIoU"] == pytest.approx(60.0)


def test_json_safe_and_format():
  assert M.json_safe({"a": math.nan, "b": 1.5}) == {"a": None, "b": 1.5}
  assert M.format_value(math.nan) == "n/a" and M.format_value(12.345) == "12.35"
