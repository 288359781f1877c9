"""Training noise on proposal boxes, so that a model trained on clean (e.g. ground-truth) boxes meets boxes like a
detector's: misplaced, missing (targets included) and spurious.

`perturb(boxes, is_target, height, width, rng, config)` applies, in this order and with draws from `rng` only (so a
sample's boxes are fixed by its generator):
1. drop: each target box with probability `drop_target_prob`, every other box with `drop_other_prob`;
2. jitter: each kept box's centre moves by up to `jitter` × its width / height, and its width and height are scaled
   by factors in [1 - jitter, 1 + jitter] (uniform);
3. false positives: Poisson(`false_positives`) boxes per call; each is, with probability `shifted_copy_prob` (when
   the input has boxes), a copy of a random input box moved by 0.5–1 of its width and height in random directions
   (so its IoU with that box is at most 0.25), else a random box with sides `false_positive_size` (fractions of the
   image's) placed uniformly inside the image. False positives are never targets;
4. every box clipped to the image, boxes left without area removed, and (with `shuffle`) the order permuted, so a
   box's slot says nothing about where it came from.
Config: `data.proposal_noise` (configs/data_common.py); disabled, the boxes pass through unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """`data.proposal_noise`; see the module docstring for what each key does."""
  enabled: bool = False
  jitter: float = 0.1
  drop_target_prob: float = 0.1
  drop_other_prob: float = 0.2
  false_positives: float = 1.0
  shifted_copy_prob: float = 0.5
  false_positive_size: tuple[float, float] = (0.05, 0.5)
  shuffle: bool = True
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "false_positive_size", tuple(float(v) for v in self.false_positive_size))
    checks = {
        "jitter": 0 <= self.jitter < 1,
        "drop_target_prob": 0 <= self.drop_target_prob <= 1,
        "drop_other_prob": 0 <= self.drop_other_prob <= 1,
        "false_positives": self.false_positives >= 0,
        "shifted_copy_prob": 0 <= self.shifted_copy_prob <= 1,
        "false_positive_size": (len(self.false_positive_size) == 2
                                and 0 < self.false_positive_size[0] <= self.false_positive_size[1] <= 1),
        "seed": isinstance(self.seed, int) and self.seed >= 0,
    }
    expected = {"jitter": "in [0, 1)", "false_positives": ">= 0 (a mean count)",
                "false_positive_size": "(min, max) with 0 < min <= max <= 1", "seed": "an int >= 0"}
    for key, ok in checks.items():
      if not ok:
        raise ValueError(f"data.proposal_noise.{key} must be {expected.get(key, 'a probability in [0, 1]')}, got "
                         f"{getattr(self, key)!r}")

  @classmethod
  def from_dict(cls, options: dict) -> NoiseConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
      raise ValueError(f"data.proposal_noise: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**options)


def _sizes(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Centres and sizes (cx, cy, w, h), each [N]."""
  return ((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, boxes[:, 2] - boxes[:, 0],
          boxes[:, 3] - boxes[:, 1])


def _from_sizes(cx, cy, w, h) -> np.ndarray:
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).reshape(-1, 4)  # [N, 4]


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
  """Boxes [N, 4] moved by up to `jitter` × their size and rescaled by factors in [1 - jitter, 1 + jitter]."""
  cx, cy, w, h = _sizes(boxes)
  shift = rng.uniform(-jitter, jitter, (len(boxes), 2))  # [N, 2]
  scale = rng.uniform(1 - jitter, 1 + jitter, (len(boxes), 2))  # [N, 2]
  return _from_sizes(cx + shift[:, 0] * w, cy + shift[:, 1] * h, w * scale[:, 0], h * scale[:, 1])


def false_positive_boxes(boxes: np.ndarray, height: int, width: int, rng: np.random.Generator,
                         config: NoiseConfig) -> np.ndarray:
  """Poisson(config.false_positives) spurious boxes [M, 4]: shifted copies of `boxes` or random boxes."""
  count = int(rng.poisson(config.false_positives))
  low, high = config.false_positive_size
  out = []
  for _ in range(count):
    if len(boxes) and rng.random() < config.shifted_copy_prob:
      cx, cy, w, h = _sizes(boxes[rng.integers(len(boxes))][None])
      offset = rng.uniform(0.5, 1.0, 2) * rng.choice([-1.0, 1.0], 2)  # [2] in units of the box's size
      out.append(_from_sizes(cx + offset[0] * w, cy + offset[1] * h, w, h)[0])
    else:
      w, h = rng.uniform(low, high) * width, rng.uniform(low, high) * height
      x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
      out.append(np.array([x0, y0, x0 + w, y0 + h]))
  return np.asarray(out, np.float64).reshape(-1, 4)


def perturb(boxes: np.ndarray, is_target: np.ndarray, height: int, width: int, rng: np.random.Generator,
            config: NoiseConfig) -> tuple[np.ndarray, np.ndarray]:
  """Noisy boxes [M, 4] float32 (original pixels) and their target flags [M]; the input itself when disabled."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  is_target = np.asarray(is_target, bool).reshape(-1)
  if not config.enabled:
    return boxes, is_target
  source = boxes.astype(np.float64)
  keep = rng.random(len(source)) >= np.where(is_target, config.drop_target_prob, config.drop_other_prob)
  kept = jitter_boxes(source[keep], rng, config.jitter)
  spurious = false_positive_boxes(source, height, width, rng, config)
  noisy = np.clip(np.concatenate([kept, spurious]), 0, [width, height, width, height])  # [M, 4]
  flags = np.concatenate([is_target[keep], np.zeros((len(spurious),), bool)])  # [M]
  has_area = (noisy[:, 2] > noisy[:, 0]) & (noisy[:, 3] > noisy[:, 1])
  noisy, flags = noisy[has_area], flags[has_area]
  if config.shuffle:
    order = rng.permutation(len(noisy))
    noisy, flags = noisy[order], flags[order]
  return noisy.astype(np.float32), flags
