"""models/vit_sizes.py: the sizes CLIP's and SAM's ViT configs share, their checks and what follows from them."""

from __future__ import annotations

import dataclasses

import pytest

from unires_jax.models.clip_vit import ClipVitConfig
from unires_jax.models.sam_vit import SamVitConfig
from unires_jax.models.vit_sizes import VitSizes

SIZES = dict(image_size=64, patch_size=16, width=48, depth=2, num_heads=4, mlp_dim=96)
SAM_EXTRA = dict(window_size=2, global_attn_indexes=(1,), out_channels=8)


def test_head_dim_and_grid_size():
  sizes = VitSizes(**SIZES)
  assert (sizes.head_dim, sizes.grid_size) == (12, 4)
  assert (ClipVitConfig(**SIZES).head_dim, SamVitConfig(**SIZES, **SAM_EXTRA).grid_size) == (12, 4)


def test_the_sizes_lead_the_fields_of_both_configs():
  # Positional construction (and the order of to_dict keys) stays what it was before the sizes were shared.
  assert [f.name for f in dataclasses.fields(ClipVitConfig)] == [*SIZES, "select_layer", "layer_norm_eps"]
  assert [f.name for f in dataclasses.fields(SamVitConfig)] == [*SIZES, *SAM_EXTRA, "layer_norm_eps"]
  assert ClipVitConfig(64, 16, 48, 2, 4, 96) == ClipVitConfig(**SIZES)


@pytest.mark.parametrize("config, extra", [(ClipVitConfig, {}), (SamVitConfig, SAM_EXTRA)])
def test_sizes_that_do_not_divide_are_refused_naming_the_config(config, extra):
  with pytest.raises(ValueError, match=f"{config.__name__}: width 50 is not divisible by num_heads 4"):
    config(**{**SIZES, "width": 50}, **extra)
  with pytest.raises(ValueError, match=f"{config.__name__}: image_size 60 is not divisible by patch_size 16"):
    config(**{**SIZES, "image_size": 60}, **extra)
