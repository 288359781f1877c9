"""The first training step's gradient norm at a fresh initialisation, on images padded as the pipeline pads them.

Resize-longest + zero pad leaves a constant region in every non-square image. With zero-initialised first-layer
biases, that region's features were equal across channels, the LayerNorm after them had zero variance, and each
such norm scaled gradients by 1/sqrt(eps): the toy run logged grad_norm ≈ 6e9 at its first steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from configs import common
from unires_jax.data import transforms
from unires_jax.models.example_batch import example_batch
from unires_jax.train import partition, state as state_lib, step as step_lib

# Far below the failure (tiny 1.2e9 before the fix) and above what a fresh model gives: tiny 12.3, tiny with the SAM
# ViT 12.4, small 58.5 (measured with first_step_grad_norm on 2-core CPU, batch 2 / 1 for small).
MAX_FIRST_STEP_GRAD_NORM = 100.0
TINY_SAM = dict(image_size=128, patch_size=16, width=32, depth=2, num_heads=4, mlp_dim=64, window_size=4,
                global_attn_indexes=[1], out_channels=32)


def padded_batch(model_cfg, batch_size: int) -> dict:
  """example_batch with its images replaced by 3:4 photos through the pipeline's resize-longest + zero pad."""
  model = state_lib.build_model(model_cfg)
  batch = example_batch(model.config, batch_size)
  rng = np.random.default_rng(0)
  for key in ("image_low", "image_high"):
    size = batch[key].shape[1]
    photos = rng.integers(0, 256, size=(batch_size, 90, 120, 3), dtype=np.uint8)  # [B, h, w, 3], wider than tall
    batch[key] = np.stack([transforms.preprocess_image(photo, size) for photo in photos])
  return model, batch


def first_step_grad_norm(model_cfg, batch_size: int = 2) -> float:
  model, batch = padded_batch(model_cfg, batch_size)
  assert (batch["image_high"][:, -1] == 0).all(), "the images must carry the pipeline's zero padding"
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  mask = partition.trainable_mask(params, (".*",), ())
  grads = jax.jit(lambda p, b: step_lib.grads_for(model, p, mask, b, dict(ce=1.0, bce=2.0, dice=0.5)))(params, batch)
  return float(optax.global_norm(grads))


def test_first_step_grad_norm_tiny():
  norm = first_step_grad_norm(common.model_config("tiny"))
  assert np.isfinite(norm) and norm < MAX_FIRST_STEP_GRAD_NORM, norm


def test_first_step_grad_norm_tiny_with_sam_vit_dense_features():
  config = common.model_config("tiny")
  config.dense_source = "sam_vit"
  config.sam_vit = TINY_SAM
  norm = first_step_grad_norm(config)
  assert np.isfinite(norm) and norm < MAX_FIRST_STEP_GRAD_NORM, norm


@pytest.mark.slow
def test_first_step_grad_norm_small():
  norm = first_step_grad_norm(common.model_config("small"), batch_size=1)
  assert np.isfinite(norm) and norm < MAX_FIRST_STEP_GRAD_NORM, norm
