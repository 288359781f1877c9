"""SAM ViT encoder against transformers' `SamModel.vision_encoder`: import, numerics, export, wrong sizes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from unires_jax.convert import sam_vit as sam_vit_convert  # noqa: E402
from unires_jax.models import sam_vit  # noqa: E402
from unires_jax.models.sam_vit import SamVisionEncoder, SamVitConfig  # noqa: E402

pytestmark = pytest.mark.torch

# A 5×5 grid with 3×3 windows (so windows are padded to 6×6), 3 heads of 8, a global block in the middle.
CONFIG = SamVitConfig(image_size=80, patch_size=16, width=24, depth=3, num_heads=3, mlp_dim=40, window_size=3,
                      global_attn_indexes=(1,), out_channels=16)


def _hf_sam_model(cfg: SamVitConfig, seed: int):
  """A tiny random `SamModel`; every tensor random (norms, positions and relative tables included)."""
  vision = transformers.SamVisionConfig(**sam_vit_convert.sam_vit_config_to_hf(cfg), num_pos_feats=8)
  config = transformers.SamConfig(
      vision_config=vision.to_dict(),
      prompt_encoder_config=dict(hidden_size=16, image_size=cfg.image_size, patch_size=cfg.patch_size,
                                 mask_input_channels=4),
      mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                               iou_head_hidden_dim=16))
  model = transformers.SamModel(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
  return model


@pytest.fixture(scope="module")
def sam_model():
  return _hf_sam_model(CONFIG, seed=0)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_encoder_matches_hf(sam_model):
  images = np.random.default_rng(1).normal(size=(2, 80, 80, 3)).astype(np.float32)
  with torch.no_grad():
    expected = sam_model.vision_encoder(torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state
  expected = expected.numpy().transpose(0, 2, 3, 1)  # [B, g, g, out]
  params = sam_vit_convert.import_sam_vit(sam_model.state_dict(), CONFIG)
  features = jax.jit(SamVisionEncoder(CONFIG).apply)({"params": params}, jnp.asarray(images))
  assert features.shape == expected.shape == (2, 5, 5, 16)
  assert _max_abs(features, expected) < 1e-4


def test_relative_positions_match_hf_interpolation(sam_model):
  """Table sizes that differ from the query/key sizes, and unequal query and key sizes."""
  attention = sam_model.vision_encoder.layers[0].attn
  table = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
  for q_size, k_size in [(3, 3), (6, 6), (2, 2), (4, 7), (7, 3)]:
    expected = attention.get_rel_pos(q_size, k_size, torch.from_numpy(table)).numpy()
    got = sam_vit.relative_positions(q_size, k_size, jnp.asarray(table))
    assert _max_abs(got, expected) < 1e-6, (q_size, k_size)


def test_export_loads_strict_and_round_trips(sam_model):
  source = {k: v.detach().numpy().copy() for k, v in sam_model.state_dict().items()
            if k.startswith(sam_vit_convert.PREFIX)}
  params = sam_vit_convert.import_sam_vit(source, CONFIG)
  exported = sam_vit_convert.export_sam_vit(params, CONFIG)
  assert set(exported) == set(source)
  for name, value in source.items():
    assert exported[name].dtype == value.dtype
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  fresh = _hf_sam_model(CONFIG, seed=5)
  fresh.vision_encoder.load_state_dict(
      {k[len(sam_vit_convert.PREFIX):]: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  for name, value in fresh.vision_encoder.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), source[sam_vit_convert.PREFIX + name], err_msg=name)


def test_wrong_size_is_refused(sam_model):
  state = sam_model.state_dict()
  wider = SamVitConfig(**{**CONFIG.__dict__, "width": 30, "num_heads": 3})
  with pytest.raises(ValueError, match="patch_embed.projection.weight"):
    sam_vit_convert.import_sam_vit(state, wider)
  larger_image = SamVitConfig(**{**CONFIG.__dict__, "image_size": 96})
  with pytest.raises(ValueError, match="pos_embed"):
    sam_vit_convert.import_sam_vit(state, larger_image)
  deeper = SamVitConfig(**{**CONFIG.__dict__, "depth": 4})
  with pytest.raises(KeyError, match="layers.3"):
    sam_vit_convert.import_sam_vit(state, deeper)
  shallower = SamVitConfig(**{**CONFIG.__dict__, "depth": 2})
  with pytest.raises(KeyError, match="not mapped"):
    sam_vit_convert.import_sam_vit(state, shallower)
  other_window = SamVitConfig(**{**CONFIG.__dict__, "window_size": 4})
  with pytest.raises(ValueError, match="rel_pos_h"):
    sam_vit_convert.import_sam_vit(state, other_window)
  with pytest.raises(KeyError, match="prefix"):
    sam_vit_convert.import_sam_vit(state, CONFIG, prefix="image_encoder.")
