"""Mask decoder pieces against hand-computed values, plus invariants: sharded == unsharded, every weight used,
samples independent, the config contract and the logical axis names."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from unires_jax import sharding
from unires_jax.convert.mapping import flatten_params
from unires_jax.models.mask_decoder import (DensePromptEncoder, MaskDecoder, MaskDecoderConfig, PatchConvTranspose,
                                            RandomFourierEmbedding)

CFG = MaskDecoderConfig(**common.model_config("tiny").mask_decoder.to_dict())
# One two-way block keeps compile times short; the depth-2 stack is checked against HF in test_sam_parity.py.
CFG = dataclasses.replace(CFG, depth=1)
LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm", "conv_spatial", None}


def _inputs(batch=2, height=4, width=4, queries=2, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, height, width, CFG.transformer_dim)), jnp.float32),
          jnp.asarray(rng.normal(size=(batch, queries, CFG.transformer_dim)), jnp.float32))


@pytest.fixture(scope="module")
def variables():
  image, sparse = _inputs()
  return jax.jit(MaskDecoder(CFG).init)(jax.random.key(0), image, sparse)


@pytest.mark.parametrize("size", common.MODEL_SIZES)
def test_config_sections_build(size):
  cfg = MaskDecoderConfig(**common.model_config(size).mask_decoder.to_dict())
  assert cfg.num_mask_tokens == cfg.num_multimask_outputs + 1


def test_config_errors_name_the_field():
  with pytest.raises(TypeError, match="hidden_size"):
    MaskDecoderConfig(**{**common.model_config("tiny").mask_decoder.to_dict(), "hidden_size": 32})
  with pytest.raises(ValueError, match="transformer_dim"):
    MaskDecoderConfig(transformer_dim=36, num_heads=4)
  with pytest.raises(ValueError, match="num_heads"):
    MaskDecoderConfig(transformer_dim=32, num_heads=3)


def test_patch_conv_transpose_hand_computed_and_loop_reference():
  conv = PatchConvTranspose(1)
  kernel = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
  params = {"params": {"kernel": kernel, "bias": jnp.asarray([0.5])}}
  out = conv.apply(params, jnp.full((1, 1, 1, 1), 2.0))
  np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], [[2.5, 4.5], [6.5, 8.5]])

  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
  kernel = rng.normal(size=(2, 2, 4, 5)).astype(np.float32)
  bias = rng.normal(size=(5,)).astype(np.float32)
  want = np.zeros((2, 6, 4, 5), np.float32)
  for i in range(3):
    for j in range(2):
      for a in range(2):
        for b in range(2):
          want[:, 2 * i + a, 2 * j + b] = x[:, i, j] @ kernel[a, b] + bias
  got = PatchConvTranspose(5).apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_random_fourier_embedding_hand_computed():
  matrix = jnp.asarray([[0.25, 1.0], [0.0, -0.5]])  # [2, 2] → 4 channels
  out = RandomFourierEmbedding(2).apply({"params": {"positional_embedding": matrix}}, jnp.asarray([1.0, 0.5]))
  # 2c - 1 = (1, 0) → projection (0.25, 1.0) → ×2π.
  angles = 2 * math.pi * np.array([0.25, 1.0])
  np.testing.assert_allclose(np.asarray(out), np.concatenate([np.sin(angles), np.cos(angles)]), atol=1e-6)


def test_dense_positional_encoding_is_x_then_y_at_pixel_centres():
  encoder = DensePromptEncoder(CFG)
  params = jax.jit(encoder.init, static_argnums=(1, 2))(jax.random.key(1), 3, 5)
  image_pe, dense_prompt = jax.jit(encoder.apply, static_argnums=(1, 2))(params, 3, 5)  # non-square to catch a swapped axis
  assert image_pe.shape == (3, 5, CFG.transformer_dim)
  matrix = np.asarray(nn.meta.unbox(params)["params"]["shared_embedding"]["positional_embedding"])
  row, col = 2, 1
  coords = np.array([(col + 0.5) / 5, (row + 0.5) / 3])
  angles = 2 * math.pi * ((2 * coords - 1) @ matrix)
  np.testing.assert_allclose(np.asarray(image_pe[row, col]), np.concatenate([np.sin(angles), np.cos(angles)]),
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(dense_prompt),
                                np.asarray(nn.meta.unbox(params)["params"]["no_mask_embed"]["embedding"])[0])


def test_every_parameter_has_logical_names(variables):
  specs = flatten_params(nn.get_partition_spec(variables)["params"])
  shapes = flatten_params(nn.meta.unbox(variables)["params"])
  assert set(specs) == set(shapes)
  for path, spec in specs.items():
    assert len(spec) == shapes[path].ndim, path
    assert set(spec) <= LOGICAL_NAMES, (path, spec)
    assert len([n for n in spec if n is not None]) == len({n for n in spec if n is not None}), (path, spec)
  assert tuple(specs["upscale_conv1/kernel"]) == ("conv_spatial", None, "embed", "mlp")
  assert tuple(specs["transformer/layers_0/self_attn/q_proj/kernel"]) == ("embed", "heads")


def test_outputs_select_sam_tokens_and_every_weight_is_used(variables):
  image, sparse = _inputs()
  decoder = MaskDecoder(CFG)
  apply = jax.jit(decoder.apply, static_argnums=3)
  single_masks, single_iou = apply(variables, image, sparse, False)
  multi_masks, multi_iou = apply(variables, image, sparse, True)
  assert single_masks.shape == (2, 1, 16, 16) and multi_masks.shape == (2, 3, 16, 16)
  assert single_iou.shape == (2, 1) and multi_iou.shape == (2, 3)
  # Token 0 (single) and tokens 1..3 (multi) come from different hypernetworks.
  assert float(jnp.abs(single_masks[:, 0] - multi_masks[:, 0]).max()) > 1e-3

  def objective(params):
    v = {"params": params}
    s_masks, s_iou = decoder.apply(v, image, sparse)
    m_masks, m_iou = decoder.apply(v, image, sparse, True)
    return (s_masks.sum() + m_masks.sum() + s_iou.sum() + m_iou.sum()) * 1e-3

  grads = flatten_params(nn.meta.unbox(jax.jit(jax.grad(objective))(variables["params"])))
  dead = [path for path, g in grads.items() if float(jnp.abs(g).max()) == 0.0]
  assert not dead


def test_samples_are_independent(variables):
  image, sparse = _inputs(batch=2)
  apply = jax.jit(MaskDecoder(CFG).apply)
  both_masks, both_iou = apply(variables, image, sparse)
  first_masks, first_iou = apply(variables, image[:1], sparse[:1])
  np.testing.assert_allclose(np.asarray(both_masks[:1]), np.asarray(first_masks), atol=1e-5)
  np.testing.assert_allclose(np.asarray(both_iou[:1]), np.asarray(first_iou), atol=1e-5)


def test_sharded_equals_unsharded(variables):
  image, sparse = _inputs(batch=4, seed=3)
  decoder = MaskDecoder(CFG)
  want_masks, want_iou = jax.jit(decoder.apply)(variables, image, sparse)

  mesh = sharding.make_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  rules = sharding.DEFAULT_RULES
  param_shardings = sharding.logical_to_shardings(variables, mesh, rules)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  plain_vars = nn.meta.unbox(variables)  # outside the mesh: unboxing there would add sharding constraints
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded_vars = jax.device_put(plain_vars, param_shardings)
    got_masks, got_iou = jax.jit(decoder.apply)(sharded_vars, jax.device_put(image, batch_sharding),
                                                jax.device_put(sparse, batch_sharding))
  np.testing.assert_allclose(np.asarray(got_masks), np.asarray(want_masks), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_iou), np.asarray(want_iou), atol=1e-5)


def test_bfloat16_compute_tracks_float32(variables):
  image, sparse = _inputs()
  want_masks, _ = jax.jit(MaskDecoder(CFG).apply)(variables, image, sparse)
  got_masks, got_iou = jax.jit(MaskDecoder(CFG, dtype=jnp.bfloat16).apply)(variables, image, sparse)
  assert got_masks.dtype == jnp.float32 and got_iou.dtype == jnp.float32
  scale = float(jnp.abs(want_masks).max())
  assert float(jnp.abs(got_masks - want_masks).max()) < 0.1 * scale


def test_wrong_width_is_refused(variables):
  image, sparse = _inputs()
  with pytest.raises(ValueError, match="width 32"):
    MaskDecoder(CFG).apply(variables, image, sparse[..., :16])
