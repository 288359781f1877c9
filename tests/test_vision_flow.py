"""Multi-granularity vision flow: region tokens from ROI Align, projectors, granularity embeddings, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unires_jax.models.roi_align import roi_align
from unires_jax.models.vision_flow import MultiGranularityVisionFlow, VisionFlowConfig

CFG = VisionFlowConfig(max_object_boxes=2, max_part_boxes=3, roi_output_size=2, sampling_ratio=2, roi_feature_stage=1)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(2, 5, 8)).astype(np.float32)  # [B, Ni, Dv]
  stages = [rng.normal(size=(2, 64 // s, 64 // s, 4 * s)).astype(np.float32) for s in (4, 8, 16, 32)]
  object_boxes = np.array([[[0, 0, 32, 32], [8, 8, 60, 40]], [[4, 4, 20, 50], [0, 0, 1, 1]]], np.float32)
  object_mask = np.array([[True, True], [True, False]])
  part_boxes = rng.uniform(0, 60, size=(2, 3, 4)).astype(np.float32)
  part_boxes[..., 2:] = part_boxes[..., :2] + 3
  part_mask = np.array([[True, False, False], [True, True, True]])
  return image, stages, object_boxes, object_mask, part_boxes, part_mask


def _apply(params, inputs):
  module = MultiGranularityVisionFlow(CFG, llm_width=16)
  return module.apply({"params": params}, *inputs, canvas_size=64)


@pytest.fixture(scope="module")
def params():
  module = MultiGranularityVisionFlow(CFG, llm_width=16)
  variables = module.init(jax.random.key(0), *_inputs(), canvas_size=64)
  return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, variables["params"],
                      is_leaf=lambda x: hasattr(x, "value"))


def test_object_token_is_the_projected_roi_mean_plus_geometry(params):
  inputs = _inputs()
  out = _apply(params, inputs)
  image, stages, object_boxes = inputs[0], inputs[1], inputs[2]
  pooled = roi_align(jnp.asarray(stages[1]), jnp.asarray(object_boxes), output_size=2, spatial_scale=stages[1].shape[2] / 64,
                     sampling_ratio=2, aligned=True).mean(axis=(2, 3))  # [B, N, C]
  x0, y0, x1, y1 = np.moveaxis(object_boxes / 64, -1, 0)
  features = np.concatenate([np.asarray(pooled), np.stack([x0, y0, x1, y1, x1 - x0, y1 - y0], -1)], -1)
  p = params["object_projector"]
  hidden = features @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
  hidden = np.asarray(jax.nn.gelu(hidden, approximate=False))
  expected = hidden @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])
  expected = expected + np.asarray(params["granularity_embedding"])[1]
  np.testing.assert_allclose(np.asarray(out["object"][0]), expected[0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["object"][1, 0]), expected[1, 0], atol=1e-5)


def test_padded_boxes_give_zero_tokens_and_do_not_matter(params):
  inputs = list(_inputs())
  out = _apply(params, inputs)
  assert np.all(np.asarray(out["object"][1, 1]) == 0)
  assert np.all(np.asarray(out["part"][0, 1:]) == 0)
  inputs[4] = inputs[4].copy()
  inputs[4][0, 1:] = [[1, 1, 50, 50], [2, 2, 9, 9]]  # move padded part boxes
  moved = _apply(params, inputs)
  np.testing.assert_array_equal(np.asarray(moved["part"]), np.asarray(out["part"]))


def test_granularities_are_distinguished(params):
  """Identical inputs through the object and part paths still differ (own projector + embedding)."""
  inputs = list(_inputs())
  inputs[4][:, :2] = inputs[2]
  inputs[5][:, :2] = inputs[3]
  out = _apply(params, inputs)
  assert not np.allclose(np.asarray(out["object"][0, 0]), np.asarray(out["part"][0, 0]))
  image_tokens = np.asarray(out["image"])
  assert image_tokens.shape == (2, 5, 16)


def test_box_count_must_match_the_config(params):
  inputs = list(_inputs())
  inputs[2] = np.zeros((2, 3, 4), np.float32)
  inputs[3] = np.ones((2, 3), bool)
  with pytest.raises(ValueError, match="max_object_boxes"):
    _apply(params, inputs)
  with pytest.raises(ValueError, match="roi_feature_stage"):
    VisionFlowConfig(2, 2, 2, 2, roi_feature_stage=5)
