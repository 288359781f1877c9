"""Training proposal noise: identity when disabled, seeded, jitter bound, drop rates, false positives."""

from __future__ import annotations

import numpy as np
import pytest

from unires_jax.data import pipeline
from unires_jax.data import proposal_noise as noise

H, W = 200, 300


def _boxes(count: int, rng: np.random.Generator) -> np.ndarray:
  """Boxes [count, 4] of 20-40 px well inside the image, so jitter never reaches an edge."""
  size = rng.uniform(20, 40, (count, 2))
  x0 = rng.uniform(60, W - 100, count)
  y0 = rng.uniform(60, H - 100, count)
  return np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1).astype(np.float32)


def _config(**overrides) -> noise.NoiseConfig:
  base = dict(enabled=True, jitter=0.0, drop_target_prob=0.0, drop_other_prob=0.0, false_positives=0.0,
              shuffle=False)
  return noise.NoiseConfig(**{**base, **overrides})


def test_disabled_is_the_identity():
  boxes = _boxes(5, np.random.default_rng(0))
  flags = np.array([True, False, False, True, False])
  rng = np.random.default_rng(1)
  state = rng.bit_generator.state
  out, out_flags = noise.perturb(boxes, flags, H, W, rng, noise.NoiseConfig(enabled=False, jitter=0.5))
  np.testing.assert_array_equal(out, boxes)
  np.testing.assert_array_equal(out_flags, flags)
  assert rng.bit_generator.state == state  # no draws either
  # Enabled with every knob at zero changes nothing but the dtype.
  out, out_flags = noise.perturb(boxes, flags, H, W, np.random.default_rng(1), _config())
  np.testing.assert_array_equal(out, boxes)
  np.testing.assert_array_equal(out_flags, flags)


def test_same_generator_same_boxes_other_generator_other_boxes():
  boxes = _boxes(6, np.random.default_rng(0))
  flags = np.arange(6) % 2 == 0
  config = noise.NoiseConfig(enabled=True, false_positives=3.0)
  first = noise.perturb(boxes, flags, H, W, np.random.default_rng(7), config)
  second = noise.perturb(boxes, flags, H, W, np.random.default_rng(7), config)
  other = noise.perturb(boxes, flags, H, W, np.random.default_rng(8), config)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])
  assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


def test_jitter_moves_centres_and_sizes_within_the_bound():
  rng = np.random.default_rng(0)
  boxes = _boxes(2000, rng)
  jitter = 0.2
  out, _ = noise.perturb(boxes, np.zeros(len(boxes), bool), H, W, rng, _config(jitter=jitter))
  assert out.shape == boxes.shape  # nothing dropped, nothing added, order kept (shuffle off)
  size = boxes[:, 2:] - boxes[:, :2]  # [N, 2]
  centre_shift = (out[:, :2] + out[:, 2:]) / 2 - (boxes[:, :2] + boxes[:, 2:]) / 2
  scale = (out[:, 2:] - out[:, :2]) / size
  assert np.all(np.abs(centre_shift) <= jitter * size + 1e-3)
  assert np.all((scale >= 1 - jitter - 1e-4) & (scale <= 1 + jitter + 1e-4))
  # Uniform draws fill the range: the extremes come close to the bound, and the shifts average out.
  assert np.abs(centre_shift / size).max() > 0.95 * jitter and abs((centre_shift / size).mean()) < 0.01
  assert scale.min() < 1 - 0.95 * jitter and scale.max() > 1 + 0.95 * jitter


def test_drop_rates_match_their_probabilities():
  rng = np.random.default_rng(0)
  boxes = _boxes(4000, rng)
  flags = np.arange(len(boxes)) % 4 == 0  # 1000 targets, 3000 others
  config = _config(drop_target_prob=0.3, drop_other_prob=0.6)
  kept_targets = kept_others = 0
  for _ in range(5):
    out, out_flags = noise.perturb(boxes, flags, H, W, rng, config)
    kept_targets += int(out_flags.sum())
    kept_others += int((~out_flags).sum())
    # Survivors are unchanged input boxes (no jitter) with their own flags.
    index = {tuple(b): f for b, f in zip(boxes.tolist(), flags)}
    assert all(index[tuple(b)] == f for b, f in zip(out.tolist(), out_flags))
  # Binomial standard deviations: sqrt(5000 * 0.3 * 0.7) = 32 and sqrt(15000 * 0.6 * 0.4) = 60 boxes.
  assert abs(1 - kept_targets / 5000 - 0.3) < 0.02
  assert abs(1 - kept_others / 15000 - 0.6) < 0.012


def test_drop_target_prob_one_removes_every_target():
  boxes = _boxes(10, np.random.default_rng(0))
  flags = np.arange(10) < 3
  out, out_flags = noise.perturb(boxes, flags, H, W, np.random.default_rng(0), _config(drop_target_prob=1.0))
  assert not out_flags.any() and len(out) == 7
  np.testing.assert_array_equal(out, boxes[3:])


def test_false_positives_count_kinds_and_placement():
  rng = np.random.default_rng(0)
  boxes = _boxes(3, rng)
  config = _config(false_positives=2.0, shifted_copy_prob=0.5, false_positive_size=(0.1, 0.3))
  added, copies, random_boxes = [], 0, 0
  for _ in range(2000):
    out, out_flags = noise.perturb(boxes, np.ones(3, bool), H, W, rng, config)
    np.testing.assert_array_equal(out[:3], boxes)  # real boxes first (shuffle off), untouched
    assert out_flags[:3].all() and not out_flags[3:].any()  # false positives are never targets
    spurious = out[3:]
    added.append(len(spurious))
    assert np.all(spurious >= 0) and np.all(spurious[:, [0, 2]] <= W) and np.all(spurious[:, [1, 3]] <= H)
    assert np.all(spurious[:, 2:] > spurious[:, :2])
    for box in spurious:
      size = box[2:] - box[:2]
      source = np.flatnonzero(np.all(np.abs(boxes[:, 2:] - boxes[:, :2] - size) < 1e-3, axis=1))
      if len(source):  # a shifted copy: same size, moved by 0.5-1 of it on both axes, IoU with its box <= 1/4
        copies += 1
        original = boxes[source[0]]
        offset = np.abs((box[:2] - original[:2]) / size)
        assert np.all((offset >= 0.5 - 1e-4) & (offset <= 1.0 + 1e-4))
        assert pipeline.box_iou(box, original)[0, 0] <= 0.25 + 1e-6
      else:  # a random box: sides within false_positive_size of the image's
        random_boxes += 1
        assert np.all((size / [W, H] >= 0.1 - 1e-5) & (size / [W, H] <= 0.3 + 1e-5))
  # Poisson(2) per call; half are copies (the boxes sit far from the edges, so no copy is clipped away).
  assert abs(np.mean(added) - 2.0) < 0.1 and abs(np.var(added) - 2.0) < 0.25
  assert abs(copies / (copies + random_boxes) - 0.5) < 0.05


def test_without_input_boxes_every_false_positive_is_random_and_shuffle_permutes():
  rng = np.random.default_rng(3)
  out, flags = noise.perturb(np.zeros((0, 4)), np.zeros(0, bool), H, W, rng,
                             _config(false_positives=5.0, shifted_copy_prob=1.0))
  assert len(out) > 0 and not flags.any()
  sides = (out[:, 2:] - out[:, :2]) / [W, H]
  assert np.all((sides >= 0.05 - 1e-5) & (sides <= 0.5 + 1e-5))
  boxes = _boxes(50, np.random.default_rng(0))
  flags = np.arange(50) % 2 == 0
  shuffled, shuffled_flags = noise.perturb(boxes, flags, H, W, np.random.default_rng(0), _config(shuffle=True))
  assert not np.array_equal(shuffled, boxes)
  order = [boxes.tolist().index(b) for b in shuffled.tolist()]
  assert sorted(order) == list(range(50))
  np.testing.assert_array_equal(shuffled_flags, flags[order])  # flags travel with their boxes


def test_boxes_are_clipped_to_the_image():
  boxes = np.array([[0, 0, 40, 40], [W - 30, H - 30, W, H]], np.float32)
  out, _ = noise.perturb(boxes, np.zeros(2, bool), H, W, np.random.default_rng(0), _config(jitter=0.5))
  assert np.all(out >= 0) and np.all(out[:, [0, 2]] <= W) and np.all(out[:, [1, 3]] <= H)


@pytest.mark.parametrize("overrides, message", [
    (dict(jitter=1.0), "jitter must be in \\[0, 1\\)"),
    (dict(drop_other_prob=-0.1), "drop_other_prob must be a probability"),
    (dict(false_positives=-1.0), "false_positives must be >= 0"),
    (dict(false_positive_size=(0.5, 0.2)), "false_positive_size must be \\(min, max\\)"),
    (dict(seed=-1), "seed must be an int >= 0"),
])
def test_bad_settings_are_named(overrides, message):
  with pytest.raises(ValueError, match=f"data.proposal_noise.{message}"):
    noise.NoiseConfig(**overrides)
  with pytest.raises(ValueError, match="unknown key\\(s\\) \\['jiter'\\]"):
    noise.NoiseConfig.from_dict({"jiter": 0.1})
