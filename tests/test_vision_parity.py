"""Image encoders against transformers' `CLIPVisionModel` / `ConvNextModel`: import, numerics, export, timm keys."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from unires_jax.convert import clip_vit as clip_convert  # noqa: E402
from unires_jax.convert import convnext as convnext_convert  # noqa: E402
from unires_jax.models.clip_vit import ClipVisionTransformer, ClipVitConfig  # noqa: E402
from unires_jax.models.convnext import ConvNeXt, ConvNextConfig  # noqa: E402

pytestmark = pytest.mark.torch

# Odd sizes: a 5×5 patch grid, 3 heads of 8, an MLP width that is no multiple of the width.
VIT = ClipVitConfig(image_size=30, patch_size=6, width=24, depth=3, num_heads=3, mlp_dim=40, select_layer=-2)
CONVNEXT = ConvNextConfig(image_size=64, depths=(1, 2, 1, 2), dims=(8, 12, 20, 24), layer_norm_eps=1e-6,
                          layer_scale_init=0.5)


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Every tensor random (norms and layer scales included), so a swapped or untransposed one shows."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def clip_model():
  torch.manual_seed(0)
  hf_config = transformers.CLIPVisionConfig(**clip_convert.clip_vit_config_to_hf(VIT))
  model = transformers.CLIPVisionModel(hf_config).eval()
  _randomise(model, 0)
  return model


@pytest.fixture(scope="module")
def convnext_model():
  hf_config = transformers.ConvNextConfig(**convnext_convert.convnext_config_to_hf(CONVNEXT))
  model = transformers.ConvNextModel(hf_config).eval()
  _randomise(model, 1)
  return model


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("height,width", [(30, 30), (42, 24)])
def test_clip_features_match_hf(clip_model, height, width):
  """Native size, and a non-square size where both sides resample the position embeddings bicubically."""
  images = np.random.default_rng(2).normal(size=(2, height, width, 3)).astype(np.float32)
  with torch.no_grad():
    out = clip_model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True,
                     interpolate_pos_encoding=(height, width) != (VIT.image_size,) * 2)
  expected = out.hidden_states[VIT.select_layer][:, 1:].numpy()
  params = clip_convert.import_clip_vit(clip_model.state_dict(), VIT, prefix="")
  apply = jax.jit(functools.partial(ClipVisionTransformer(VIT).apply, mutable=["intermediates"]))
  features, state = apply({"params": params}, jnp.asarray(images))
  assert features.shape == expected.shape
  assert _max_abs(features, expected) < 1e-4
  assert _max_abs(state["intermediates"]["pooled"][0], out.pooler_output.numpy()) < 1e-4


def test_clip_export_loads_strict_and_round_trips(clip_model):
  source = _state_dict_numpy(clip_model)
  params = clip_convert.import_clip_vit(source, VIT, prefix="")
  exported = clip_convert.export_clip_vit(params, VIT, prefix="")
  assert set(exported) == set(source)
  for name, value in source.items():
    assert exported[name].dtype == value.dtype
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  fresh = transformers.CLIPVisionModel(clip_model.config)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  for name, value in fresh.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), source[name], err_msg=name)


def test_clip_on_disk_layout_reads_a_full_checkpoint_and_loads_with_from_pretrained(clip_model, tmp_path):
  """`vision_model.`-prefixed names (CLIPModel / LLaVA checkpoints); the text tower beside them is left alone."""
  from safetensors.numpy import save_file

  source = _state_dict_numpy(clip_model)
  checkpoint = {f"vision_model.{name}": value for name, value in source.items()}
  checkpoint["text_model.embeddings.token_embedding.weight"] = np.zeros((7, 4), np.float32)
  params = clip_convert.import_clip_vit(checkpoint, VIT)
  exported = clip_convert.export_clip_vit(params, VIT)
  assert set(exported) == set(checkpoint) - {"text_model.embeddings.token_embedding.weight"}
  clip_model.config.save_pretrained(tmp_path)
  save_file(exported, str(tmp_path / "model.safetensors"))
  loaded = transformers.CLIPVisionModel.from_pretrained(tmp_path)
  for name, value in loaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), source[name], err_msg=name)


def test_clip_wrong_size_checkpoint_is_refused_naming_the_tensor(clip_model):
  wider = ClipVitConfig(**{**VIT.__dict__, "mlp_dim": 48})
  with pytest.raises(ValueError, match=r"'encoder\.layers\.0\.mlp\.fc1\.weight'"):
    clip_convert.import_clip_vit(clip_model.state_dict(), wider, prefix="")
  with pytest.raises(KeyError, match=r"'encoder\.layers\.3\."):
    clip_convert.import_clip_vit(clip_model.state_dict(), ClipVitConfig(**{**VIT.__dict__, "depth": 4}), prefix="")
  with pytest.raises(KeyError, match="no tensor starts with prefix 'vision_model.'"):
    clip_convert.import_clip_vit(clip_model.state_dict(), VIT)


@pytest.mark.parametrize("height,width", [(64, 64), (96, 64)])
def test_convnext_stage_outputs_match_hf(convnext_model, height, width):
  images = np.random.default_rng(3).normal(size=(2, height, width, 3)).astype(np.float32)
  with torch.no_grad():
    out = convnext_model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
  stage_outputs = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states[1:]]  # [0] is the stem output
  params = convnext_convert.import_convnext(convnext_model.state_dict(), CONVNEXT)
  apply = jax.jit(functools.partial(ConvNeXt(CONVNEXT).apply, mutable=["intermediates"]))
  feature_maps, state = apply({"params": params}, jnp.asarray(images))
  assert len(feature_maps) == len(stage_outputs) == 4
  for stage, (got, want) in enumerate(zip(feature_maps, stage_outputs)):
    assert got.shape == want.shape, stage
    assert _max_abs(got, want) < 1e-4, stage
  assert _max_abs(state["intermediates"]["pooled"][0], out.pooler_output.numpy()) < 1e-4


def test_convnext_export_loads_strict_and_round_trips(convnext_model):
  source = _state_dict_numpy(convnext_model)
  params = convnext_convert.import_convnext(source, CONVNEXT)
  exported = convnext_convert.export_convnext(params, CONVNEXT)
  assert set(exported) == set(source)
  for name, value in source.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  fresh = transformers.ConvNextModel(convnext_model.config)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_timm_layout_round_trips_onto_the_same_params(convnext_model):
  hf_params = convnext_convert.import_convnext(convnext_model.state_dict(), CONVNEXT)
  timm_state = convnext_convert.export_convnext_timm(hf_params, CONVNEXT, prefix="visual.trunk.")
  assert "visual.trunk.stages.1.blocks.0.conv_dw.weight" in timm_state
  assert "visual.trunk.stem.1.weight" in timm_state and "visual.trunk.head.norm.bias" in timm_state
  # An open_clip checkpoint also holds the text tower and timm's classifier: both are left alone.
  checkpoint = {**timm_state, "text.token_embedding.weight": np.zeros((3, 2), np.float32),
                "visual.trunk.head.fc.weight": np.zeros((5, 24), np.float32)}
  timm_params = convnext_convert.import_convnext_timm(checkpoint, CONVNEXT, prefix="visual.trunk.")
  hf_leaves = jax.tree_util.tree_leaves_with_path(hf_params)
  timm_leaves = dict(jax.tree_util.tree_leaves_with_path(timm_params))
  assert len(hf_leaves) == len(timm_leaves)
  for path, value in hf_leaves:
    np.testing.assert_array_equal(timm_leaves[path], value, err_msg=jax.tree_util.keystr(path))
  back = convnext_convert.export_convnext_timm(timm_params, CONVNEXT, prefix="visual.trunk.")
  for name, value in timm_state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  with pytest.raises(KeyError, match=r"visual\.trunk\.stages\.2\.blocks\.0\.extra"):
    convnext_convert.import_convnext_timm(
        {**checkpoint, "visual.trunk.stages.2.blocks.0.extra": np.zeros(1, np.float32)}, CONVNEXT,
        prefix="visual.trunk.")


def test_convnext_wrong_size_checkpoint_is_refused_naming_the_tensor(convnext_model):
  wider = ConvNextConfig(**{**CONVNEXT.__dict__, "dims": (8, 16, 20, 24)})
  with pytest.raises(ValueError, match=r"encoder\.stages\.1\.downsampling_layer\.1\.weight"):
    convnext_convert.import_convnext(convnext_model.state_dict(), wider)


def test_bicubic_position_resampling_matches_torch():
  from unires_jax.models.clip_vit import resize_position_grid

  grid = np.random.default_rng(4).normal(size=(5, 5, 6)).astype(np.float32)
  for height, width in [(7, 4), (3, 9), (5, 5)]:
    want = torch.nn.functional.interpolate(torch.from_numpy(grid.transpose(2, 0, 1))[None], size=(height, width),
                                           mode="bicubic", align_corners=False)[0].numpy().transpose(1, 2, 0)
    assert _max_abs(resize_position_grid(jnp.asarray(grid), height, width), want) < 1e-5
