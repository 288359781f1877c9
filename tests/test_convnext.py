"""ConvNeXt: numpy references of the stem and a block, output strides and widths, translation equivariance of a
stage, input checks and sharded == unsharded."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import common
from unires_jax import sharding
from unires_jax.models.convnext import (DEPTHWISE_IMPLS, ConvNeXt, ConvNextBlock, ConvNextConfig, ConvNextStage,
                                       depthwise_conv, resolve_depthwise_impl)

TINY = ConvNextConfig(**common.model_config("tiny").convnext.to_dict())
# Odd widths, two blocks in a stage, and a layer scale big enough to matter.
SMALL = ConvNextConfig(image_size=64, depths=(1, 2, 1, 1), dims=(6, 10, 12, 14), layer_scale_init=0.7)


def _randomise(abstract_params, seed: int) -> dict:
  """A param tree of the given shapes, every leaf random (norm scales and layer scales included)."""
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(abstract_params))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.normal(size=x.shape).astype(np.float32) * 0.5 for x in leaves])


def _params_of(module: nn.Module, input_shape: tuple[int, ...], seed: int) -> dict:
  inputs = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return _randomise(jax.eval_shape(lambda x: module.init(jax.random.key(0), x), inputs)["params"], seed)


def _run(module: nn.Module, params, inputs):
  return jax.jit(module.apply)({"params": params}, jnp.asarray(inputs))


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _reference_block(p, x, eps):
  """One block from the definition, float64: 7×7 depthwise conv with zero padding 3, LN, 4× MLP, scale, skip."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  batch, height, width, channels = x.shape
  padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  kernel = p["dwconv"]["kernel"][:, :, 0, :]  # [7, 7, C]
  mixed = np.zeros_like(x) + p["dwconv"]["bias"]
  for dy in range(7):
    for dx in range(7):
      mixed += padded[:, dy:dy + height, dx:dx + width, :] * kernel[dy, dx]
  h = _layer_norm(mixed, p["norm"], eps)
  h = h @ p["pwconv1"]["kernel"] + p["pwconv1"]["bias"]
  h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
  h = h @ p["pwconv2"]["kernel"] + p["pwconv2"]["bias"]
  return x + h * p["layer_scale"]


@pytest.mark.parametrize("impl", DEPTHWISE_IMPLS)
def test_block_matches_numpy_reference(impl):
  x = np.random.default_rng(1).normal(size=(2, 9, 11, 6)).astype(np.float32)  # odd, non-square map
  block = ConvNextBlock(dataclasses.replace(SMALL, depthwise_impl=impl), dim=6)
  params = _params_of(block, x.shape, seed=2)
  expected = _reference_block(params, x.astype(np.float64), SMALL.layer_norm_eps)
  np.testing.assert_allclose(np.asarray(_run(block, params, x)), expected, atol=1e-5, rtol=0)


def test_stem_matches_numpy_reference():
  """The stem is a 4×4 stride-4 patch projection then a LayerNorm: the first feature map of a network whose
  first stage has no block is exactly that."""
  cfg = dataclasses.replace(SMALL, depths=(0, 1, 1, 1))
  images = np.random.default_rng(3).normal(size=(2, 64, 32, 3)).astype(np.float32)
  model = ConvNeXt(cfg)
  params = _params_of(model, images.shape, seed=4)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  patches = images.astype(np.float64).reshape(2, 16, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 8, 48)
  stem = patches @ p["stem_conv"]["kernel"].reshape(48, cfg.dims[0]) + p["stem_conv"]["bias"]
  expected = _layer_norm(stem, p["stem_norm"], cfg.layer_norm_eps)
  np.testing.assert_allclose(np.asarray(_run(model, params, images)[0]), expected, atol=1e-5, rtol=0)


def test_downsampling_matches_numpy_reference():
  """A stage's downsampling: channel LayerNorm, then a 2×2 stride-2 conv (a patch projection)."""
  cfg = dataclasses.replace(SMALL, depths=(1, 0, 1, 1))
  x = np.random.default_rng(5).normal(size=(2, 6, 4, 6)).astype(np.float32)
  stage = ConvNextStage(cfg, stage=1)
  params = _params_of(stage, x.shape, seed=6)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  normed = _layer_norm(x.astype(np.float64), p["downsample_norm"], cfg.layer_norm_eps)
  patches = normed.reshape(2, 3, 2, 2, 2, 6).transpose(0, 1, 3, 2, 4, 5).reshape(2, 3, 2, 24)
  expected = patches @ p["downsample_conv"]["kernel"].reshape(24, 10) + p["downsample_conv"]["bias"]
  np.testing.assert_allclose(np.asarray(_run(stage, params, x)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height,width", [(128, 128), (64, 96)])
def test_output_strides_and_widths(height, width):
  model = ConvNeXt(TINY)
  images = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  maps = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert [m.shape for m in maps] == [(2, height // s, width // s, c) for s, c in zip((4, 8, 16, 32), TINY.dims)]


def test_stage_is_translation_equivariant_away_from_borders():
  """Shifting a stage-1 input by 2 pixels (its stride) shifts the output by 1, wherever neither the zero padding
  nor the wrap-around of the shift is within reach (2 blocks of 7×7: 6 output pixels from the border)."""
  stage = ConvNextStage(SMALL, stage=1)
  x = np.random.default_rng(7).normal(size=(1, 40, 44, 6)).astype(np.float32)
  params = _params_of(stage, x.shape, seed=8)
  out = np.asarray(_run(stage, params, x))  # [1, 20, 22, 10]
  shifted = np.asarray(_run(stage, params, np.roll(x, (4, -2), axis=(1, 2))))
  expected = np.roll(out, (2, -1), axis=(1, 2))
  margin = 6 + 2
  inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
  np.testing.assert_allclose(shifted[inner], expected[inner], atol=1e-5, rtol=0)
  # Near the border the padding breaks it: the check above is not vacuous.
  assert np.max(np.abs(shifted[:, :2] - expected[:, :2])) > 1e-3


def test_image_size_not_divisible_by_32_is_refused():
  model = ConvNeXt(TINY)
  with pytest.raises(ValueError, match=r"image size 128x112 is not divisible by the total stride 32"):
    model.init(jax.random.key(0), jnp.zeros((1, 128, 112, 3)))
  with pytest.raises(ValueError, match="image_size 100"):
    dataclasses.replace(TINY, image_size=100)
  with pytest.raises(ValueError, match="4 entries"):
    dataclasses.replace(TINY, depths=(1, 1, 1))
  with pytest.raises(TypeError, match="drop_path"):
    ConvNextConfig(**{**common.model_config("tiny").convnext.to_dict(), "drop_path": 0.1})


def test_sharded_dims_of_tiny_divide_by_four_and_sharded_equals_unsharded():
  model = ConvNeXt(TINY)
  images = np.random.default_rng(9).normal(size=(4, 64, 64, 3)).astype(np.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(images.shape,
                                                                                           jnp.float32))
  specs = jax.tree.leaves(nn.get_partition_spec(abstract)["params"],
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = [x.shape for x in jax.tree.leaves(nn.meta.unbox(abstract)["params"])]
  for spec, shape in zip(specs, shapes):
    for name, dim in zip(spec, shape):
      if name not in (None, "norm", "conv_spatial"):
        assert dim % 4 == 0, (spec, shape)

  params = _randomise(abstract["params"], seed=10)
  expected = _run(model, params, images)
  mesh = sharding.make_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_from_config(common.sharding_rules())
  param_shardings = sharding.logical_to_shardings(abstract, mesh, rules)["params"]
  assert param_shardings["stage_1"]["block_0"]["pwconv1"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp",
                                                                                                       "tensor")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    placed = jax.device_put(params, param_shardings)
    got = jax.jit(lambda p, x: model.apply({"params": p}, x))(placed, images)
  for got_map, want_map in zip(got, expected):
    # Sharded reductions sum in another order: equal up to float32 rounding of the map's magnitude.
    scale = float(np.max(np.abs(np.asarray(want_map))))
    np.testing.assert_allclose(np.asarray(got_map), np.asarray(want_map), atol=2e-6 * scale, rtol=0)


def test_depthwise_formulations_agree_and_the_backend_picks_one():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 13, 10, 5)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(7, 7, 1, 5)).astype(np.float32))
  shifted = jax.jit(lambda a, k: depthwise_conv(a, k, "shifted"))(x, kernel)
  grouped = jax.jit(lambda a, k: depthwise_conv(a, k, "grouped"))(x, kernel)
  np.testing.assert_allclose(np.asarray(shifted), np.asarray(grouped), atol=2e-5, rtol=0)
  # A one-hot kernel at the centre is the identity; one tap to the right reads the left neighbour's value.
  centre = np.zeros((7, 7, 1, 5), np.float32)
  centre[3, 3] = 1.0
  np.testing.assert_array_equal(np.asarray(depthwise_conv(x, jnp.asarray(centre), "shifted")), np.asarray(x))
  right = np.zeros((7, 7, 1, 5), np.float32)
  right[3, 4] = 1.0
  moved = np.asarray(depthwise_conv(x, jnp.asarray(right), "shifted"))
  np.testing.assert_array_equal(moved[:, :, :-1], np.asarray(x)[:, :, 1:])
  np.testing.assert_array_equal(moved[:, :, -1], 0.0)
  assert resolve_depthwise_impl("auto", "cpu") == "shifted"
  assert resolve_depthwise_impl("auto", "gpu") == "grouped"
  assert resolve_depthwise_impl("grouped", "cpu") == "grouped"
  with pytest.raises(ValueError, match="depthwise_impl"):
    ConvNextConfig(image_size=64, depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), depthwise_impl="fft")
