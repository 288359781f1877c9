"""HF `SamModel` `vision_encoder.*` tensors ↔ `SamVisionEncoder` params (one declarative table, both directions).

The fused qkv Linear `[3D, D]` becomes the per-head kernel `[D, 3, H, Dh]` (and its bias `[3, H, Dh]`); the output
projection `[D, D]` becomes `[H, Dh, D]`; `pos_embed` drops torch's leading batch axis.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.convert import mapping
from unires_jax.convert.hf_configs import sam_vit_config_to_hf  # noqa: F401  (re-exported)
from unires_jax.convert.common import tensor_to_numpy
from unires_jax.models.sam_vit import SamVisionEncoder, SamVitConfig

# `SamModel` and `SamVisionModel` both hold the encoder as `vision_encoder`.
PREFIX = "vision_encoder."


def _attention_entries(cfg: SamVitConfig, jax_layer: str, torch_layer: str) -> list[mapping.Entry]:
  heads, head_dim, width = cfg.num_heads, cfg.head_dim, cfg.width
  return [
      # [3D, D] → [D, 3, H, Dh]
      mapping.Entry.make(f"{jax_layer}/attn/qkv_kernel", f"{torch_layer}.attn.qkv.weight",
                         lambda w: np.ascontiguousarray(w.T.reshape(width, 3, heads, head_dim)),
                         lambda k: np.ascontiguousarray(k.reshape(width, 3 * heads * head_dim).T)),
      mapping.Entry.make(f"{jax_layer}/attn/qkv_bias", f"{torch_layer}.attn.qkv.bias",
                         lambda b: b.reshape(3, heads, head_dim), lambda b: b.reshape(3 * heads * head_dim)),
      mapping.Entry.make(f"{jax_layer}/attn/proj_kernel", f"{torch_layer}.attn.proj.weight",
                         lambda w: np.ascontiguousarray(w.T.reshape(heads, head_dim, width)),  # [D, D] → [H, Dh, D]
                         lambda k: np.ascontiguousarray(k.reshape(heads * head_dim, width).T)),
      mapping.Entry.make(f"{jax_layer}/attn/proj_bias", f"{torch_layer}.attn.proj.bias"),
      mapping.Entry.make(f"{jax_layer}/attn/rel_pos_h", f"{torch_layer}.attn.rel_pos_h"),
      mapping.Entry.make(f"{jax_layer}/attn/rel_pos_w", f"{torch_layer}.attn.rel_pos_w"),
  ]


@dataclasses.dataclass(frozen=True)
class SamVitNames:
  """The torch names of the encoder's pieces, which differ between HF `SamVisionEncoder` (the defaults) and
  segment-anything's `ImageEncoderViT` (`SEGMENT_ANYTHING_NAMES`, LISA's layout); the tensors are the same."""
  patch_embed: str = "patch_embed.projection"
  blocks: str = "layers"
  block_norm: str = "layer_norm"  # the blocks' `{block_norm}1`, `{block_norm}2`
  neck_convs: tuple[str, str] = ("neck.conv1", "neck.conv2")
  neck_norms: tuple[str, str] = ("neck.layer_norm1", "neck.layer_norm2")


SEGMENT_ANYTHING_NAMES = SamVitNames(patch_embed="patch_embed.proj", blocks="blocks", block_norm="norm",
                                     neck_convs=("neck.0", "neck.2"), neck_norms=("neck.1", "neck.3"))


def sam_vit_table(cfg: SamVitConfig, prefix: str = PREFIX, names: SamVitNames = SamVitNames()
                  ) -> list[mapping.Entry]:
  """The JAX path ↔ torch name table for one config (the head reshapes and the depth depend on it)."""
  entries = [
      mapping.Entry.make("patch_embed/kernel", f"{prefix}{names.patch_embed}.weight", mapping.conv_to_jax,
                         mapping.conv_to_torch),
      mapping.Entry.make("patch_embed/bias", f"{prefix}{names.patch_embed}.bias"),
      mapping.Entry.make("pos_embed", prefix + "pos_embed", lambda p: p[0], lambda p: p[None]),
  ]
  for index in range(cfg.depth):
    jax_layer, torch_layer = f"layers_{index}", f"{prefix}{names.blocks}.{index}"
    entries += (mapping.norm(f"{jax_layer}/layer_norm1", f"{torch_layer}.{names.block_norm}1")
                + _attention_entries(cfg, jax_layer, torch_layer)
                + mapping.norm(f"{jax_layer}/layer_norm2", f"{torch_layer}.{names.block_norm}2")
                + mapping.linear(f"{jax_layer}/mlp/lin1", f"{torch_layer}.mlp.lin1")
                + mapping.linear(f"{jax_layer}/mlp/lin2", f"{torch_layer}.mlp.lin2"))
  entries += [mapping.Entry.make(f"neck/conv{n}/kernel", f"{prefix}{conv}.weight", mapping.conv_to_jax,
                                 mapping.conv_to_torch) for n, conv in enumerate(names.neck_convs, 1)]
  for n, norm in enumerate(names.neck_norms, 1):
    entries += mapping.norm(f"neck/layer_norm{n}", prefix + norm)
  return entries


def param_shapes(cfg: SamVitConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{path: shape}` of the encoder's params, without allocating them."""
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: SamVisionEncoder(cfg).init(jax.random.key(0), x), images)
  return {path: tuple(leaf.shape)
          for path, leaf in mapping.flatten_params(nn.meta.unbox(abstract)["params"]).items()}


def import_sam_vit(state_dict: Mapping, cfg: SamVitConfig, prefix: str = PREFIX) -> dict:
  """HF SAM state dict (numpy or torch tensors) → the `params` tree of `SamVisionEncoder`.

  Only tensors under `prefix` are read (a `SamModel` also holds the prompt encoder and the mask decoder); among
  them the import is strict: an unmapped or missing tensor, or a shape that does not fit `cfg`, raises naming it.
  """
  state_dict = {name: tensor_to_numpy(value) for name, value in state_dict.items() if name.startswith(prefix)}
  if not state_dict:
    raise KeyError(f"SAM checkpoint: no tensor starts with prefix {prefix!r}")
  flat, _ = mapping.import_params(sam_vit_table(cfg, prefix), state_dict, expected=param_shapes(cfg),
                                  what="SAM vision encoder checkpoint")
  return mapping.unflatten_params(flat)


def export_sam_vit(params: Mapping, cfg: SamVitConfig, prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """`SamVisionEncoder` params (boxed or not) → HF SAM vision-encoder state dict of numpy arrays under `prefix`."""
  flat = {path: np.asarray(value) for path, value in mapping.flatten_params(nn.meta.unbox(params)).items()}
  return mapping.export_params(sam_vit_table(cfg, prefix), flat)


def sam_vit_config_from_hf(vision_config: Mapping) -> SamVitConfig:
  """`SamConfig.vision_config` (its `to_dict()` / config.json entry) → `SamVitConfig` (the inverse of
  `hf_configs.sam_vit_config_to_hf`); variants this encoder does not implement are refused, naming the setting."""
  for key, want in (("qkv_bias", True), ("use_abs_pos", True), ("use_rel_pos", True), ("hidden_act", "gelu")):
    if key in vision_config and vision_config[key] != want:
      raise ValueError(f"SAM vision config: {key}={vision_config[key]!r} is not supported (expected {want!r})")
  try:
    width = int(vision_config["hidden_size"])
    mlp_dim = vision_config.get("mlp_dim") or int(width * float(vision_config.get("mlp_ratio", 4.0)))
    return SamVitConfig(image_size=int(vision_config["image_size"]), patch_size=int(vision_config["patch_size"]),
                        width=width, depth=int(vision_config["num_hidden_layers"]),
                        num_heads=int(vision_config["num_attention_heads"]), mlp_dim=int(mlp_dim),
                        window_size=int(vision_config["window_size"]),
                        global_attn_indexes=tuple(vision_config["global_attn_indexes"]),
                        out_channels=int(vision_config["output_channels"]),
                        layer_norm_eps=float(vision_config.get("layer_norm_eps", 1e-6)))
  except KeyError as e:
    raise KeyError(f"SAM config: vision_config has no {e.args[0]!r}") from e
