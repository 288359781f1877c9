"""Hugging Face `SamModel` ↔ `MaskDecoder` parameters: the mask decoder and the dense prompt-encoder pieces.

The JAX tree mirrors HF's module names (`transformer/layers_0/self_attn/q_proj` ↔
`mask_decoder.transformer.layers.0.self_attn.q_proj`), so the table is generated from the config. HF ties
`shared_image_embedding.positional_embedding` to `prompt_encoder.shared_embedding.positional_embedding`; import
reads either (and refuses two different copies), export writes both. The SAM image encoder and the box and mask
prompt embeddings are not part of this model and are skipped on import; the point prompt embeddings
(`prompt_encoder.point_embed.{0,1}`, `not_a_point_embed`) are mapped when `point_prompts` is on, else skipped.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.convert import mapping
from unires_jax.convert.common import tensor_to_numpy
from unires_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig

POSITIONAL = "prompt_encoder.shared_embedding.positional_embedding"
TIED_POSITIONAL = "shared_image_embedding.positional_embedding"
# SamModel tensors outside this model, allowed to be present and left unmapped.
SKIPPED = (r"vision_encoder\..*", r"shared_image_embedding\..*", r"prompt_encoder\.mask_embed\..*",
           r"prompt_encoder\.point_embed\..*", r"prompt_encoder\.not_a_point_embed\..*")


def _as_config(cfg: MaskDecoderConfig | Any) -> MaskDecoderConfig:
  if isinstance(cfg, MaskDecoderConfig):
    return cfg
  return MaskDecoderConfig(**(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)))


def _conv_transpose_to_jax(w: np.ndarray) -> np.ndarray:
  """torch ConvTranspose2d weight [in, out, kh, kw] → [kh, kw, in, out]."""
  return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _conv_transpose_to_torch(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.transpose(2, 3, 0, 1))


def _attention(jax_prefix: str, torch_prefix: str) -> list[mapping.Entry]:
  return [e for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
          for e in mapping.linear(f"{jax_prefix}/{proj}", f"{torch_prefix}.{proj}")]


def _feed_forward(jax_prefix: str, torch_prefix: str, num_layers: int) -> list[mapping.Entry]:
  names = [("proj_in", "proj_in")] + [(f"layers_{j}", f"layers.{j}") for j in range(num_layers - 2)]
  names.append(("proj_out", "proj_out"))
  return [e for jax_name, torch_name in names
          for e in mapping.linear(f"{jax_prefix}/{jax_name}", f"{torch_prefix}.{torch_name}")]


def two_way_transformer_table(depth: int, torch_prefix: str, norm: str = "layer_norm") -> list[mapping.Entry]:
  """The two-way transformer (`transformer/...`) ↔ `{torch_prefix}.layers.{i}.*` and its final attention; `norm`
  is the stem of the torch norms' names (HF `layer_norm{n}`, segment-anything `norm{n}`)."""
  table = []
  for i in range(depth):
    jax_layer, torch_layer = f"transformer/layers_{i}", f"{torch_prefix}.layers.{i}"
    for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
      table += _attention(f"{jax_layer}/{attn}", f"{torch_layer}.{attn}")
    table += mapping.linear(f"{jax_layer}/mlp/lin1", f"{torch_layer}.mlp.lin1")
    table += mapping.linear(f"{jax_layer}/mlp/lin2", f"{torch_layer}.mlp.lin2")
    for n in range(1, 5):
      table += mapping.norm(f"{jax_layer}/layer_norm{n}", f"{torch_layer}.{norm}{n}")
  table += _attention("transformer/final_attn_token_to_image", f"{torch_prefix}.final_attn_token_to_image")
  table += mapping.norm("transformer/layer_norm_final_attn", f"{torch_prefix}.{norm}_final_attn")
  return table


def upscaling_table(torch_prefix: str, conv_names: tuple[str, str], norm_name: str) -> list[mapping.Entry]:
  """The mask upscaling (transposed conv, LayerNorm2d, transposed conv) ↔ `{torch_prefix}.{name}` torch names."""
  table = []
  for conv, torch_name in zip(("upscale_conv1", "upscale_conv2"), conv_names):
    table += [mapping.Entry.make(f"{conv}/kernel", f"{torch_prefix}.{torch_name}.weight", _conv_transpose_to_jax,
                                 _conv_transpose_to_torch),
              mapping.Entry.make(f"{conv}/bias", f"{torch_prefix}.{torch_name}.bias")]
  return table + mapping.norm("upscale_layer_norm", f"{torch_prefix}.{norm_name}")


def sam_decoder_table(cfg: MaskDecoderConfig | Any) -> list[mapping.Entry]:
  """Every `MaskDecoder` parameter and its `SamModel` state-dict name."""
  cfg = _as_config(cfg)
  md = "mask_decoder"
  table = [
      mapping.Entry.make("prompt_encoder/shared_embedding/positional_embedding", POSITIONAL),
      mapping.Entry.make("prompt_encoder/no_mask_embed/embedding", "prompt_encoder.no_mask_embed.weight"),
      mapping.Entry.make("iou_token/embedding", f"{md}.iou_token.weight"),
      mapping.Entry.make("mask_tokens/embedding", f"{md}.mask_tokens.weight"),
  ]
  if cfg.point_prompts:  # negative and positive point (HF's 2 and 3 are the box corners), and padding
    table += [mapping.Entry.make(f"prompt_encoder/point_embed_{i}/embedding", f"prompt_encoder.point_embed.{i}.weight")
              for i in (0, 1)]
    table.append(mapping.Entry.make("prompt_encoder/not_a_point_embed/embedding",
                                    "prompt_encoder.not_a_point_embed.weight"))
  table += two_way_transformer_table(cfg.depth, f"{md}.transformer")
  table += upscaling_table(md, ("upscale_conv1", "upscale_conv2"), "upscale_layer_norm")
  for i in range(cfg.num_mask_tokens):
    table += _feed_forward(f"output_hypernetworks_mlps_{i}", f"{md}.output_hypernetworks_mlps.{i}", 3)
  table += _feed_forward("iou_prediction_head", f"{md}.iou_prediction_head", cfg.iou_head_depth)
  return table


def _expected_shapes(cfg: MaskDecoderConfig) -> dict[str, tuple[int, ...]]:
  dim = cfg.transformer_dim
  points = (dict(point_coords=jnp.zeros((1, 1, 2)), point_labels=jnp.ones((1, 1), jnp.int32))
            if cfg.point_prompts else {})
  abstract = jax.eval_shape(functools.partial(MaskDecoder(cfg).init, **points), jax.random.key(0),
                            jnp.zeros((1, 4, 4, dim)), jnp.zeros((1, 1, dim)))
  flat = mapping.flatten_params(nn.meta.unbox(abstract["params"]))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def import_sam_decoder(state_dict: Mapping[str, Any], cfg: MaskDecoderConfig | Any) -> dict:
  """`SamModel` state dict (torch tensors or numpy arrays) → the `MaskDecoder` params tree.

  Strict: a missing tensor, a tensor of the wrong shape or an unknown `mask_decoder.*` / `prompt_encoder.*`
  tensor raises, naming it. Returns `{'prompt_encoder': ..., 'transformer': ..., ...}` (unboxed numpy arrays).
  """
  cfg = _as_config(cfg)
  weights = {name: tensor_to_numpy(value) for name, value in state_dict.items()}
  if POSITIONAL not in weights and TIED_POSITIONAL in weights:
    weights[POSITIONAL] = weights[TIED_POSITIONAL]
  elif POSITIONAL in weights and TIED_POSITIONAL in weights:
    if not np.array_equal(weights[POSITIONAL], weights[TIED_POSITIONAL]):
      raise ValueError(f"SAM checkpoint: {POSITIONAL!r} and {TIED_POSITIONAL!r} should be one tied tensor but "
                       f"differ")
  flat, _ = mapping.import_params(sam_decoder_table(cfg), weights, expected=_expected_shapes(cfg),
                                  what="SAM checkpoint", allow_unused=SKIPPED)
  return mapping.unflatten_params(flat)


def export_sam_decoder(params: Mapping, cfg: MaskDecoderConfig | Any) -> dict[str, np.ndarray]:
  """`MaskDecoder` params tree (boxed or not) → `SamModel` state-dict entries (numpy), both tied names included.

  Load into a `SamModel` with `load_state_dict(..., strict=False)`: the image encoder is not part of it.
  """
  cfg = _as_config(cfg)
  flat = mapping.flatten_params(nn.meta.unbox(dict(params)))
  out = mapping.export_params(sam_decoder_table(cfg), flat)
  out[TIED_POSITIONAL] = out[POSITIONAL].copy()
  return out


def mask_decoder_config_from_hf(mask_decoder_config: Mapping[str, Any], point_prompts: bool = False
                                ) -> MaskDecoderConfig:
  """`SamConfig.mask_decoder_config` (its `to_dict()` / config.json entry) → `MaskDecoderConfig`."""
  try:
    return MaskDecoderConfig(
        transformer_dim=int(mask_decoder_config["hidden_size"]), depth=int(mask_decoder_config["num_hidden_layers"]),
        num_heads=int(mask_decoder_config["num_attention_heads"]), mlp_dim=int(mask_decoder_config["mlp_dim"]),
        attention_downsample_rate=int(mask_decoder_config["attention_downsample_rate"]),
        num_multimask_outputs=int(mask_decoder_config["num_multimask_outputs"]),
        iou_head_depth=int(mask_decoder_config["iou_head_depth"]),
        iou_head_hidden_dim=int(mask_decoder_config["iou_head_hidden_dim"]),
        layer_norm_eps=float(mask_decoder_config["layer_norm_eps"]), point_prompts=point_prompts)
  except KeyError as e:
    raise KeyError(f"SAM config: mask_decoder_config has no {e.args[0]!r}") from e
