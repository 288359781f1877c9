import numpy as np
import pytest

from unires_jax.data import transforms


def test_resized_hw_keeps_aspect_and_longest_side():
  assert transforms.resized_hw(480, 640, 320) == (240, 320)
  assert transforms.resized_hw(640, 480, 320) == (320, 240)
  with pytest.raises(ValueError, match="positive"):
    transforms.resized_hw(0, 4, 8)


def test_preprocess_pads_with_zero_and_normalises():
  image = np.full((20, 40, 3), 255, np.uint8)
  out = transforms.preprocess_image(image, 16)
  assert out.shape == (16, 16, 3)
  expected = (1.0 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)
  np.testing.assert_allclose(out[:8, :, :], np.broadcast_to(expected, (8, 16, 3)), rtol=1e-5)
  assert np.all(out[8:] == 0)


def test_boxes_follow_the_image_scale():
  boxes = transforms.transform_boxes(np.array([[0, 0, 40, 20]]), 20, 40, 16)
  np.testing.assert_allclose(boxes, [[0, 0, 16, 8]])


def test_mask_round_trip_recovers_original():
  rng = np.random.default_rng(0)
  mask = np.zeros((30, 50), bool)
  mask[5:20, 10:40] = True
  canvas = transforms.resize_mask(mask, 100)
  assert canvas.shape == (100, 100) and canvas[60:].sum() == 0
  logits = np.where(canvas > 0, 5.0, -5.0).astype(np.float32)
  back = transforms.mask_logits_to_original(logits, 30, 50)
  assert back.shape == (30, 50)
  iou = (back & mask).sum() / (back | mask).sum()
  assert iou > 0.95
  del rng
