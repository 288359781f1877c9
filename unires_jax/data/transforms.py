"""Geometry shared by the pipeline, inference and evaluation: resize-longest-side + pad, and its inverse.

Images go to a square `size × size` canvas: scaled so the longest side is `size` (aspect kept), placed at the
top-left, the rest zero (after normalisation). Boxes and masks follow the same map; predictions come back to the
original resolution by cropping the valid region and resizing, so metrics are computed at the original size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from unires_jax.pixel_stats import CLIP_MEAN, CLIP_STD  # noqa: F401  (preprocessing defaults, re-exported)


def resized_hw(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) after scaling so the longest side is `size`."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  scale = size / max(height, width)
  return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def preprocess_image(image: np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """uint8 [h, w, 3] → float32 [size, size, 3]: bilinear resize-longest, normalise, zero-pad bottom/right."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [h, w, 3], got shape {image.shape}")
  new_h, new_w = resized_hw(image.shape[0], image.shape[1], size)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32) / 255.0
  normalised = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  canvas = np.zeros((size, size, 3), np.float32)
  canvas[:new_h, :new_w] = normalised
  return canvas


def transform_boxes(boxes: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
  """Boxes [N, 4] (x0, y0, x1, y1) in original pixels → the same boxes on the `size` canvas."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scale = size / max(height, width)
  return boxes * scale


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """bool/uint8 [h, w] → float32 [size, size] in {0, 1} (nearest), on the same canvas as the image."""
  mask = np.asarray(mask)
  new_h, new_w = resized_hw(mask.shape[0], mask.shape[1], size)
  resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((new_w, new_h), Image.NEAREST)) > 127
  canvas = np.zeros((size, size), np.float32)
  canvas[:new_h, :new_w] = resized
  return canvas


def mask_logits_to_original(mask_logits: np.ndarray, height: int, width: int) -> np.ndarray:
  """Canvas logits [S, S] → bool mask [height, width]: crop the valid region, bilinear-resize, threshold at 0."""
  mask_logits = np.asarray(mask_logits, np.float32)
  size = mask_logits.shape[-1]
  new_h, new_w = resized_hw(height, width, size)
  valid = mask_logits[:new_h, :new_w]
  resized = np.asarray(Image.fromarray(valid, mode="F").resize((width, height), Image.BILINEAR))
  return resized > 0.0
