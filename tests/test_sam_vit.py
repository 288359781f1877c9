"""SAM ViT encoder: numpy references of windows and relative positions, block invariants, sharding, UniRES wiring."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, tiny
from unires_jax import sharding
from unires_jax.models import losses
from unires_jax.models import sam_vit
from unires_jax.models.example_batch import example_batch
from unires_jax.models.sam_vit import SamVisionEncoder, SamVitBlock, SamVitConfig
from unires_jax.models.unires import UniRESConfig, clip_to_sam_normalisation
from unires_jax.train import partition, state as state_lib

# A 4×4 grid, 2×2 windows, one global block.
CONFIG = SamVitConfig(image_size=32, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=24, window_size=2,
                      global_attn_indexes=(1,), out_channels=8)
TINY_SAM = dict(image_size=128, patch_size=16, width=32, depth=2, num_heads=4, mlp_dim=64, window_size=4,
                global_attn_indexes=[1], out_channels=32)


def _randomise(params, seed: int, scale: float = 0.5):
  """Every leaf random (zero-initialised positions and relative tables included)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# --- windows -------------------------------------------------------------------------------------------------------
def test_window_partition_matches_hand_layout():
  """5×5 grid, window 3: padded to 6×6, four windows in row-major order, padding zero."""
  grid = np.arange(1, 26, dtype=np.float32).reshape(1, 5, 5, 1)
  windows, padded = sam_vit.window_partition(jnp.asarray(grid), 3)
  assert padded == (6, 6)
  padded_grid = np.zeros((6, 6), np.float32)
  padded_grid[:5, :5] = grid[0, :, :, 0]
  expected = np.stack([padded_grid[r:r + 3, c:c + 3] for r in (0, 3) for c in (0, 3)])[None, ..., None]
  np.testing.assert_array_equal(np.asarray(windows), expected)
  np.testing.assert_array_equal(np.asarray(windows)[0, 0, :, :, 0], [[1, 2, 3], [6, 7, 8], [11, 12, 13]])
  np.testing.assert_array_equal(np.asarray(windows)[0, 3, :, :, 0], [[19, 20, 0], [24, 25, 0], [0, 0, 0]])


@pytest.mark.parametrize("height,width,window", [(5, 5, 3), (4, 6, 2), (7, 3, 4), (6, 6, 6)])
def test_window_unpartition_inverts_partition(height, width, window):
  x = np.random.default_rng(0).normal(size=(2, height, width, 3)).astype(np.float32)
  windows, padded = sam_vit.window_partition(jnp.asarray(x), window)
  assert windows.shape == (2, (padded[0] // window) * (padded[1] // window), window, window, 3)
  np.testing.assert_array_equal(np.asarray(sam_vit.window_unpartition(windows, padded, (height, width))), x)


# --- relative positions --------------------------------------------------------------------------------------------
def test_linear_resize_matrix_hand_values():
  np.testing.assert_array_equal(sam_vit.linear_resize_matrix(4, 4), np.eye(4, dtype=np.float32))
  # 2 → 4: source positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (right tap clamped).
  np.testing.assert_allclose(sam_vit.linear_resize_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-7)
  # 3 → 1: the centre.
  np.testing.assert_allclose(sam_vit.linear_resize_matrix(3, 1), [[0, 1, 0]], atol=1e-7)


def test_relative_position_index_hand_values():
  np.testing.assert_array_equal(sam_vit.relative_position_index(3, 3), [[2, 1, 0], [3, 2, 1], [4, 3, 2]])
  # Query side 2 stretched to key side 4 (coordinates ×2), offset (4 - 1)·1.
  np.testing.assert_array_equal(sam_vit.relative_position_index(2, 4), [[3, 2, 1, 0], [5, 4, 3, 2]])


def test_decomposed_rel_pos_matches_loop_reference():
  """term[y, x, ky, kx] = q[y, x]·Rh[y - ky + kh - 1] + q[y, x]·Rw[x - kx + kw - 1] on a 2×3 grid."""
  rng = np.random.default_rng(1)
  query = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)  # [B, qh, qw, C]
  rel_h = rng.normal(size=(3, 4)).astype(np.float32)  # 2·2 - 1 rows
  rel_w = rng.normal(size=(5, 4)).astype(np.float32)  # 2·3 - 1 rows
  expected = np.zeros((2, 2, 3, 2, 3), np.float32)
  for b in range(2):
    for y in range(2):
      for x in range(3):
        for ky in range(2):
          for kx in range(3):
            expected[b, y, x, ky, kx] = (query[b, y, x] @ rel_h[y - ky + 1]) + (query[b, y, x] @ rel_w[x - kx + 2])
  got = sam_vit.decomposed_rel_pos(jnp.asarray(query), jnp.asarray(rel_h), jnp.asarray(rel_w), (2, 3))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_relative_positions_resize_a_short_table():
  """A 3-row table used for a 3×3 grid (5 rows needed) is linearly resized first."""
  table = np.arange(6, dtype=np.float32).reshape(3, 2)
  resized = sam_vit.linear_resize_matrix(3, 5) @ table
  got = sam_vit.relative_positions(3, 3, jnp.asarray(table))
  np.testing.assert_allclose(np.asarray(got), resized[sam_vit.relative_position_index(3, 3)], atol=1e-6)


# --- attention and blocks ------------------------------------------------------------------------------------------
def _numpy_attention(x, params, num_heads):
  """Global attention with decomposed relative positions, written out for one [h, w, D] grid."""
  h, w, d = x.shape
  head_dim = d // num_heads
  qkv = np.einsum("yxd,dthk->tyxhk", x, params["qkv_kernel"]) + params["qkv_bias"][:, None, None]
  q, k, v = (a.reshape(h * w, num_heads, head_dim) for a in qkv)
  out = np.zeros((h * w, num_heads, head_dim), np.float64)
  for head in range(num_heads):
    logits = (q[:, head] * head_dim ** -0.5) @ k[:, head].T
    for i in range(h * w):
      for j in range(h * w):
        (y, xx), (ky, kx) = divmod(i, w), divmod(j, w)
        logits[i, j] += (q[i, head] @ params["rel_pos_h"][y - ky + h - 1]
                         + q[i, head] @ params["rel_pos_w"][xx - kx + w - 1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out[:, head] = (weights / weights.sum(-1, keepdims=True)) @ v[:, head]
  return np.einsum("nhc,hcd->nd", out, params["proj_kernel"]).reshape(h, w, d) + params["proj_bias"]


def test_attention_matches_numpy_reference():
  module = sam_vit.SamVitAttention(CONFIG, table_size=4)
  x = np.random.default_rng(2).normal(size=(1, 1, 4, 4, 16)).astype(np.float32)
  params = _randomise(nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x))["params"]), 3)
  got = module.apply({"params": params}, jnp.asarray(x))
  expected = _numpy_attention(x[0, 0].astype(np.float64), jax.tree.map(lambda a: np.asarray(a, np.float64), params), 2)
  np.testing.assert_allclose(np.asarray(got[0, 0]), expected, rtol=1e-4, atol=1e-4)


def _block_params(window: int, seed: int, scale: float = 0.5):
  hidden = jnp.zeros((1, 4, 4, 16))
  params = nn.meta.unbox(SamVitBlock(CONFIG, window).init(jax.random.key(0), hidden)["params"])
  return _randomise(params, seed, scale)


def test_window_covering_the_grid_equals_global_block():
  """A 4×4 window on a 4×4 grid is one window with the grid's relative tables: the global block, exactly."""
  hidden = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 4, 16)).astype(np.float32))
  params = _block_params(window=0, seed=5)
  global_out = SamVitBlock(CONFIG, 0).apply({"params": params}, hidden)
  window_out = SamVitBlock(CONFIG, 4).apply({"params": params}, hidden)
  np.testing.assert_allclose(np.asarray(window_out), np.asarray(global_out), rtol=1e-6, atol=1e-6)


def test_windowed_block_is_local_and_global_block_is_not():
  """Changing one token of the top-left 2×2 window moves a windowed block's output only inside that window."""
  rng = np.random.default_rng(6)
  hidden = rng.normal(size=(1, 4, 4, 16)).astype(np.float32)
  changed = hidden.copy()
  changed[0, 1, 0] += 3.0 * rng.normal(size=16).astype(np.float32)  # not constant: LayerNorm would remove that
  inside = np.zeros((4, 4), bool)
  inside[:2, :2] = True
  # Small weights keep the softmax away from one-hot, so every token visibly attends to every other.
  for window, params in ((2, _block_params(2, 7, 0.1)), (0, _block_params(0, 8, 0.1))):
    block = SamVitBlock(CONFIG, window)
    delta = np.abs(np.asarray(block.apply({"params": params}, jnp.asarray(changed))
                              - block.apply({"params": params}, jnp.asarray(hidden)))).max(-1)[0]  # [4, 4]
    assert np.all(delta[inside] > 1e-3), delta
    if window:
      np.testing.assert_array_equal(delta[~inside], 0.0)
    else:
      assert np.all(delta[~inside] > 1e-3), delta


def test_config_and_input_errors():
  with pytest.raises(ValueError, match="global_attn_indexes"):
    SamVitConfig(**{**CONFIG.__dict__, "global_attn_indexes": (2,)})
  with pytest.raises(ValueError, match="num_heads"):
    SamVitConfig(**{**CONFIG.__dict__, "num_heads": 3})
  with pytest.raises(TypeError, match="unknown"):
    SamVitConfig(**CONFIG.__dict__, unknown=1)
  with pytest.raises(ValueError, match="native 32x32"):
    SamVisionEncoder(CONFIG).init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)))


def test_parameter_tree_and_logical_names():
  abstract = jax.eval_shape(lambda: SamVisionEncoder(CONFIG).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = abstract["params"]
  assert params["layers_0"]["attn"]["rel_pos_h"].value.shape == (3, 8)  # window 2
  assert params["layers_1"]["attn"]["rel_pos_h"].value.shape == (7, 8)  # global over the 4×4 grid
  assert params["layers_0"]["attn"]["qkv_kernel"].names == ("embed", None, "heads", "head_dim")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), path
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named)), (path, leaf.names)


def test_sharded_encoder_equals_single_device():
  model = SamVisionEncoder(CONFIG)
  images = jnp.asarray(np.random.default_rng(9).normal(size=(4, 32, 32, 3)).astype(np.float32))
  params = _randomise(nn.meta.unbox(model.init(jax.random.key(0), images[:1])["params"]), 10)
  single = jax.jit(model.apply)({"params": params}, images)
  mesh = sharding.make_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  rules = sharding.DEFAULT_RULES
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1])["params"])
  param_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  sharded_params = jax.device_put(params, param_shardings)
  lin1_spec = sharded_params["layers_0"]["mlp"]["lin1"]["kernel"].sharding.spec
  assert lin1_spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.jit(model.apply)({"params": sharded_params}, images)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)


# --- UniRES with dense_source = "sam_vit" ----------------------------------------------------------------------------
def _sam_model_config(out_channels: int = 32):
  config = tiny.get_config()
  config.model.dense_source = "sam_vit"
  config.model.sam_vit = {**TINY_SAM, "out_channels": out_channels}
  return config


def test_unires_config_checks_the_sam_section():
  config = _sam_model_config()
  config.model.sam_vit.image_size = 256
  with pytest.raises(ValueError, match="convnext.image_size"):
    UniRESConfig.from_config(config.model)
  config = _sam_model_config()
  config.model.sam_vit.window = 3
  with pytest.raises(KeyError, match="model.sam_vit"):
    UniRESConfig.from_config(config.model)


def test_unires_feeds_sam_features_directly_at_the_decoder_width():
  """The tiny decoder width is 32: a 32-channel SAM neck needs no projection and the ConvNeXt neck is not built."""
  model = state_lib.build_model(_sam_model_config(32).model)
  batch = example_batch(model.config, batch_size=2, seed=3)
  params = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  assert "sam_vit" in params and "dense_neck" not in params and "sam_dense_proj" not in params
  dense = jax.eval_shape(lambda p, b: model.apply({"params": p}, b, method=model.encode_vision), params, batch)
  assert dense["dense"].shape == (2, 8, 8, 32)


@pytest.mark.slow
def test_unires_forward_with_sam_dense_features_trains_the_mask_path():
  """A 24-channel SAM neck goes through the 1×1 projection to the decoder width; the mask loss trains the encoder.

  Gradients are taken for the SAM encoder, the projection and the mask decoder only (the rest is held fixed), which
  keeps the LLM's backward pass out of the compiled function.
  """
  model = state_lib.build_model(_sam_model_config(24).model)
  batch = example_batch(model.config, batch_size=2, seed=3)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  assert "sam_vit" in params and "dense_neck" not in params
  assert params["sam_dense_proj"]["kernel"].shape == (24, 32)
  trained_names = ("sam_vit", "sam_dense_proj", "mask_decoder")
  trained = {k: params[k] for k in trained_names}
  fixed = {k: v for k, v in params.items() if k not in trained_names}

  def mask_loss(trained, fixed, b):
    out, state = model.apply({"params": {**fixed, **trained}}, b, mutable=["intermediates"],
                             capture_intermediates=lambda module, _: module.name == "sam_dense_proj")
    loss = losses.total_loss(out, b, dict(ce=0.0, bce=2.0, dice=0.5))[0]
    return loss, (out, state["intermediates"]["sam_dense_proj"]["__call__"][0])

  (loss, (out, dense)), grads = jax.jit(jax.value_and_grad(mask_loss, has_aux=True))(trained, fixed, batch)
  assert np.isfinite(float(loss)) and out["mask_logits"].shape == (2, 128, 128)

  # The decoder's dense features are the standalone encoder's output through the 1×1 projection.
  sam_config = SamVitConfig(**TINY_SAM | {"out_channels": 24})
  sam_input = clip_to_sam_normalisation(jnp.asarray(batch["image_high"]))  # the model re-normalises for SAM
  embeddings = SamVisionEncoder(sam_config).apply({"params": params["sam_vit"]}, sam_input)
  expected = np.einsum("bhwc,cd->bhwd", np.asarray(embeddings), np.asarray(params["sam_dense_proj"]["kernel"])) \
      + np.asarray(params["sam_dense_proj"]["bias"])
  assert dense.shape == (2, 8, 8, 32)
  np.testing.assert_allclose(np.asarray(dense), expected, rtol=1e-4, atol=1e-4)

  flat = {partition.param_path(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  encoder = [k for k in flat if k.startswith(("sam_vit/", "sam_dense_proj/"))]
  zero = [k for k in encoder if not np.any(np.asarray(flat[k]))]
  assert len(encoder) > 30 and not zero, f"SAM encoder parameters without gradient: {zero}"
  # The IoU head and the multimask hypernetworks are outside the single-mask loss; the mask's own path is not.
  assert np.any(np.asarray(flat["mask_decoder/output_hypernetworks_mlps_0/proj_out/kernel"]))
