"""ROI Align (torchvision semantics) on NHWC features, written as two interpolation matmuls so it jits statically.

torchvision's bilinear sample weight is a product of a y-weight and an x-weight, and its "outside the image"
rule (y < -1 or y > H, or the same for x) is a product of two indicators, so the average over a bin's
`s × s` samples factors into `(mean of y-weights) ⊗ (mean of x-weights)`. Each box therefore becomes a
`[oh, H]` and a `[ow, W]` weight matrix and the pooled features are `Wy · F · Wxᵀ`: exact, gather-free and
static-shaped. The adaptive sampling ratio (`sampling_ratio <= 0`, `ceil(roi_size / bin)` samples) depends on
the box values, so it is rejected rather than silently bounded.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _output_hw(output_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(output_size, int):
    return output_size, output_size
  size = tuple(int(s) for s in output_size)
  if len(size) != 2:
    raise ValueError(f"roi_align output_size must be an int or (oh, ow), got {output_size!r}")
  return size


def _axis_weights(start: jax.Array, bin_size: jax.Array, num_bins: int, sampling_ratio: int,
                  length: int) -> jax.Array:
  """Mean bilinear weights of each bin's samples along one axis: [..., num_bins, length].

  `start`, `bin_size`: [...] (one per box). Follows torchvision's border rules: a sample below -1 or above
  `length` contributes zero; otherwise it is clamped to 0 and, at or past the last pixel, snaps to it.
  """
  bins = jnp.arange(num_bins, dtype=jnp.float32)  # [nb]
  steps = (jnp.arange(sampling_ratio, dtype=jnp.float32) + 0.5) / sampling_ratio  # [s]
  offsets = bins[:, None] + steps[None, :]  # [nb, s] in bin units
  coords = start[..., None, None] + offsets * bin_size[..., None, None]  # [..., nb, s]

  inside = (coords >= -1.0) & (coords <= length)
  clamped = jnp.maximum(coords, 0.0)
  low = jnp.floor(clamped).astype(jnp.int32)
  at_last = low >= length - 1
  low = jnp.where(at_last, length - 1, low)
  high = jnp.where(at_last, length - 1, low + 1)
  frac = jnp.where(at_last, 0.0, clamped - low)  # weight of `high`

  weights = ((1.0 - frac)[..., None] * jax.nn.one_hot(low, length, dtype=jnp.float32)
             + frac[..., None] * jax.nn.one_hot(high, length, dtype=jnp.float32))  # [..., nb, s, length]
  weights = weights * inside[..., None]
  return weights.mean(axis=-2)  # [..., nb, length]


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int | Sequence[int], spatial_scale: float,
              sampling_ratio: int, aligned: bool = True, box_mask: jax.Array | None = None) -> jax.Array:
  """Pools `features` [B, H, W, C] over `boxes` [B, N, 4] → [B, N, oh, ow, C].

  Boxes are `(x0, y0, x1, y1)` in input-image pixels; `spatial_scale` maps them onto the feature grid
  (e.g. 1/16). `aligned=True` shifts by half a pixel (torchvision's `aligned`); `aligned=False` keeps the
  legacy behaviour of forcing each ROI to be at least 1×1. `box_mask` [B, N] (True = real box) zeroes the
  outputs of padded boxes. The output keeps the features' dtype; the interpolation runs in float32.
  """
  if features.ndim != 4:
    raise ValueError(f"roi_align features must be [B, H, W, C], got shape {features.shape}")
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
    raise ValueError(f"roi_align boxes must be [B, N, 4] with B = {features.shape[0]}, got shape {boxes.shape}")
  if sampling_ratio <= 0:
    raise ValueError(f"roi_align sampling_ratio must be a positive int (samples per bin per axis); got "
                     f"{sampling_ratio}. The adaptive ratio (<= 0) depends on box sizes and has no static shape.")
  out_h, out_w = _output_hw(output_size)
  _, height, width, _ = features.shape

  offset = 0.5 if aligned else 0.0
  scaled = boxes.astype(jnp.float32) * spatial_scale - offset  # [B, N, 4]
  x0, y0, x1, y1 = (scaled[..., i] for i in range(4))
  roi_w, roi_h = x1 - x0, y1 - y0
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)

  weights_y = _axis_weights(y0, roi_h / out_h, out_h, sampling_ratio, height)  # [B, N, oh, H]
  weights_x = _axis_weights(x0, roi_w / out_w, out_w, sampling_ratio, width)  # [B, N, ow, W]
  if box_mask is not None:
    weights_y = weights_y * box_mask.astype(jnp.float32)[..., None, None]

  rows = jnp.einsum("bnyh,bhwc->bnywc", weights_y, features.astype(jnp.float32))  # [B, N, oh, W, C]
  pooled = jnp.einsum("bnywc,bnxw->bnyxc", rows, weights_x)  # [B, N, oh, ow, C]
  return pooled.astype(features.dtype)
