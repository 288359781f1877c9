"""ConvNeXt state dicts ↔ `ConvNeXt` params, in two layouts of the same design:

- HF `ConvNextModel` (`embeddings.patch_embeddings`, `encoder.stages.{s}.layers.{i}.dwconv`, ..., `layernorm`);
- timm / open_clip (`stem.0`, `stages.{s}.blocks.{i}.conv_dw`, ..., `head.norm`), the layout CLIP ConvNeXt-L ships
  in (open_clip nests it under `visual.trunk.`: pass that as `prefix`).

The final norm (HF `layernorm`, timm `head.norm`) feeds only the pooled output; it is kept as `head_norm` so an
exported state dict loads with `strict=True` and round trips are bit-exact.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.convert import mapping
from unires_jax.convert.hf_configs import convnext_config_to_hf  # noqa: F401  (re-exported)
from unires_jax.convert.common import tensor_to_numpy
from unires_jax.models.convnext import NUM_STAGES, ConvNeXt, ConvNextConfig

# timm's classifier (`head.fc`) is not part of the encoder; it may be present and is then ignored.
TIMM_IGNORED = (r"head\.fc\..*",)


def _conv(jax_path: str, torch_prefix: str) -> list[mapping.Entry]:
  return [mapping.Entry.make(f"{jax_path}/kernel", f"{torch_prefix}.weight", mapping.conv_to_jax,
                             mapping.conv_to_torch),
          mapping.Entry.make(f"{jax_path}/bias", f"{torch_prefix}.bias")]


def _table(cfg: ConvNextConfig, names: Mapping[str, str], prefix: str) -> list[mapping.Entry]:
  """The table for one layout; `names` holds that layout's module names (with `{s}` stage, `{i}` block)."""
  entries = _conv("stem_conv", prefix + names["stem_conv"]) + mapping.norm("stem_norm", prefix + names["stem_norm"])
  for stage in range(NUM_STAGES):
    if stage > 0:
      entries += mapping.norm(f"stage_{stage}/downsample_norm", prefix + names["downsample_norm"].format(s=stage))
      entries += _conv(f"stage_{stage}/downsample_conv", prefix + names["downsample_conv"].format(s=stage))
    for index in range(cfg.depths[stage]):
      jax_block = f"stage_{stage}/block_{index}"
      block = prefix + names["block"].format(s=stage, i=index)
      entries += _conv(f"{jax_block}/dwconv", block + names["dwconv"])
      entries += mapping.norm(f"{jax_block}/norm", block + names["norm"])
      entries += mapping.linear(f"{jax_block}/pwconv1", block + names["pwconv1"])
      entries += mapping.linear(f"{jax_block}/pwconv2", block + names["pwconv2"])
      if cfg.layer_scale_init > 0:
        entries.append(mapping.Entry.make(f"{jax_block}/layer_scale", block + names["layer_scale"]))
  return entries + mapping.norm("head_norm", prefix + names["head_norm"])


HF_NAMES = dict(stem_conv="embeddings.patch_embeddings", stem_norm="embeddings.layernorm",
                downsample_norm="encoder.stages.{s}.downsampling_layer.0",
                downsample_conv="encoder.stages.{s}.downsampling_layer.1", block="encoder.stages.{s}.layers.{i}.",
                dwconv="dwconv", norm="layernorm", pwconv1="pwconv1", pwconv2="pwconv2",
                layer_scale="layer_scale_parameter", head_norm="layernorm")

TIMM_NAMES = dict(stem_conv="stem.0", stem_norm="stem.1", downsample_norm="stages.{s}.downsample.0",
                  downsample_conv="stages.{s}.downsample.1", block="stages.{s}.blocks.{i}.", dwconv="conv_dw",
                  norm="norm", pwconv1="mlp.fc1", pwconv2="mlp.fc2", layer_scale="gamma", head_norm="head.norm")


def convnext_hf_table(cfg: ConvNextConfig) -> list[mapping.Entry]:
  return _table(cfg, HF_NAMES, "")


def convnext_timm_table(cfg: ConvNextConfig, prefix: str = "") -> list[mapping.Entry]:
  return _table(cfg, TIMM_NAMES, prefix)


def param_shapes(cfg: ConvNextConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{path: shape}` of the module's params, without allocating them."""
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: ConvNeXt(cfg).init(jax.random.key(0), x), images)
  return {path: tuple(leaf.shape)
          for path, leaf in mapping.flatten_params(nn.meta.unbox(abstract)["params"]).items()}


def _import(entries: list[mapping.Entry], state_dict: Mapping, cfg: ConvNextConfig, what: str,
            allow_unused: Iterable[str] = ()) -> dict:
  state_dict = {name: tensor_to_numpy(value) for name, value in state_dict.items()}
  flat, _ = mapping.import_params(entries, state_dict, expected=param_shapes(cfg), what=what,
                                  allow_unused=allow_unused)
  return mapping.unflatten_params(flat)


def import_convnext(state_dict: Mapping, cfg: ConvNextConfig) -> dict:
  """HF `ConvNextModel` state dict → the `params` tree of `ConvNeXt`; strict, errors name the tensor."""
  return _import(convnext_hf_table(cfg), state_dict, cfg, "ConvNextModel checkpoint")


def import_convnext_timm(state_dict: Mapping, cfg: ConvNextConfig, prefix: str = "") -> dict:
  """timm / open_clip ConvNeXt state dict → `ConvNeXt` params.

  Only tensors under `prefix` (e.g. `'visual.trunk.'` in an open_clip CLIP checkpoint) are considered; among
  them every one must be mapped, except timm's classifier `head.fc.*`.
  """
  selected = {name: value for name, value in state_dict.items() if name.startswith(prefix)}
  if not selected:
    raise KeyError(f"timm ConvNeXt checkpoint: no tensor starts with prefix {prefix!r}")
  allowed = [prefix.replace(".", r"\.") + pattern for pattern in TIMM_IGNORED]
  return _import(convnext_timm_table(cfg, prefix), selected, cfg, "timm ConvNeXt checkpoint", allowed)


def _flat_numpy(params: Mapping) -> dict[str, np.ndarray]:
  return {path: np.asarray(value) for path, value in mapping.flatten_params(nn.meta.unbox(params)).items()}


def export_convnext(params: Mapping, cfg: ConvNextConfig) -> dict[str, np.ndarray]:
  """`ConvNeXt` params (boxed or not) → HF `ConvNextModel` state dict of numpy arrays."""
  return mapping.export_params(convnext_hf_table(cfg), _flat_numpy(params))


def export_convnext_timm(params: Mapping, cfg: ConvNextConfig, prefix: str = "") -> dict[str, np.ndarray]:
  """`ConvNeXt` params → timm-layout state dict (names under `prefix`)."""
  return mapping.export_params(convnext_timm_table(cfg, prefix), _flat_numpy(params))
