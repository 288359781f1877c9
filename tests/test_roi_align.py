"""ROI Align against a loop-by-loop numpy transcription of torchvision's definition, and a hand-computed case."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unires_jax.models.roi_align import roi_align


def _bilinear(feature: np.ndarray, y: float, x: float) -> np.ndarray:
  """torchvision's bilinear_interpolate on one [H, W, C] map."""
  height, width, _ = feature.shape
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(feature.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_high = y_low = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_high = x_low = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * feature[y_low, x_low] + hy * lx * feature[y_low, x_high]
          + ly * hx * feature[y_high, x_low] + ly * lx * feature[y_high, x_high])


def _reference(features, boxes, out_h, out_w, scale, ratio, aligned):
  batch, num_boxes = boxes.shape[:2]
  out = np.zeros((batch, num_boxes, out_h, out_w, features.shape[-1]))
  offset = 0.5 if aligned else 0.0
  for b in range(batch):
    for n in range(num_boxes):
      x0, y0, x1, y1 = (float(v) * scale - offset for v in boxes[b, n])
      roi_w, roi_h = x1 - x0, y1 - y0
      if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
      bin_h, bin_w = roi_h / out_h, roi_w / out_w
      for ph in range(out_h):
        for pw in range(out_w):
          total = np.zeros(features.shape[-1])
          for iy in range(ratio):
            y = y0 + ph * bin_h + (iy + 0.5) * bin_h / ratio
            for ix in range(ratio):
              x = x0 + pw * bin_w + (ix + 0.5) * bin_w / ratio
              total += _bilinear(features[b], y, x)
          out[b, n, ph, pw] = total / (ratio * ratio)
  return out


_BOXES = np.array([
    [[2.0, 3.0, 20.0, 25.0],      # inside
     [-10.0, -6.0, 9.0, 12.0],    # partly above/left of the image
     [18.0, 20.0, 40.0, 44.0],    # partly below/right, past the border
     [7.3, 7.9, 7.6, 8.1]],       # tiny (sub-pixel)
    [[0.0, 0.0, 32.0, 28.0],      # the whole image
     [30.0, 1.0, 31.5, 27.0],     # thin strip at the right edge
     [-40.0, -40.0, -20.0, -30.0],  # entirely outside: all samples zero
     [5.5, 12.25, 17.75, 13.0]],
], np.float32)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio,output_size", [(1, 3), (2, (2, 4)), (3, 2)])
def test_matches_loop_reference(aligned, ratio, output_size):
  rng = np.random.default_rng(ratio)
  features = rng.normal(size=(2, 7, 8, 3)).astype(np.float32)  # stride 4 over a 28×32 image
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  got = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))(
      jnp.asarray(features), jnp.asarray(_BOXES), output_size, 0.25, ratio, aligned)
  want = _reference(features, _BOXES, out_h, out_w, 0.25, ratio, aligned)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_fully_outside_box_is_zero_and_inside_is_not():
  features = np.ones((2, 7, 8, 3), np.float32)
  got = np.asarray(roi_align(jnp.asarray(features), jnp.asarray(_BOXES), 2, 0.25, 2))
  np.testing.assert_array_equal(got[1, 2], 0.0)
  # A box well inside a constant map pools to exactly that constant.
  np.testing.assert_allclose(got[0, 0], 1.0, atol=1e-6)


def test_hand_computed_case():
  # A 2×2 single-channel map [[0, 1], [2, 3]], a 1×1 output, one sample: aligned box (0, 0, 2, 2) samples the
  # point (x, y) = (0.5, 0.5) → mean of the four pixels = 1.5.
  features = jnp.asarray(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[None, :, :, None])
  boxes = jnp.asarray([[[0.0, 0.0, 2.0, 2.0]]])
  got = roi_align(features, boxes, 1, 1.0, 1, aligned=True)
  np.testing.assert_allclose(np.asarray(got).ravel(), [1.5], atol=1e-6)
  # Not aligned, box (0, 0, 1, 2): sample at (x, y) = (0.5, 1.0): y = 1 is the last row → row [2, 3] at x=0.5.
  got = roi_align(features, jnp.asarray([[[0.0, 0.0, 1.0, 2.0]]]), 1, 1.0, 1, aligned=False)
  np.testing.assert_allclose(np.asarray(got).ravel(), [2.5], atol=1e-6)
  # A 2×2 output over the aligned box (0, 0, 2, 2), one sample per bin: samples land on x, y ∈ {0, 1} (after the
  # -0.5 shift), i.e. exactly on the pixels, so the output reproduces the map.
  got = roi_align(features, boxes, 2, 1.0, 1, aligned=True)
  np.testing.assert_allclose(np.asarray(got)[0, 0, :, :, 0], [[0.0, 1.0], [2.0, 3.0]], atol=1e-6)


def test_box_mask_zeroes_padded_boxes_only():
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(2, 7, 8, 3)).astype(np.float32))
  box_mask = jnp.asarray([[True, False, True, True], [False, True, True, True]])
  masked = np.asarray(roi_align(features, jnp.asarray(_BOXES), 3, 0.25, 2, box_mask=box_mask))
  plain = np.asarray(roi_align(features, jnp.asarray(_BOXES), 3, 0.25, 2))
  np.testing.assert_array_equal(masked[0, 1], 0.0)
  np.testing.assert_array_equal(masked[1, 0], 0.0)
  np.testing.assert_allclose(masked[0, 0], plain[0, 0], atol=1e-6)
  assert np.abs(plain[0, 1]).max() > 0.01


def test_adaptive_sampling_ratio_is_rejected():
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_align(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 4)), 2, 1.0, 0)
