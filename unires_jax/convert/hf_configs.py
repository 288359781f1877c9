"""Our `model` config sections ↔ transformers configs, in one place and without JAX.

Each function takes a section as the dataclass the JAX model builds from it (`LlamaConfig`, `ClipVitConfig`, ...)
or as the plain mapping an export's `config.json` holds, and returns the keyword arguments of the matching
transformers config. The conversion tables (`convert/llama.py`, `clip_vit.py`, `convnext.py`, `sam_vit.py`) and the
PyTorch model (`convert/torch_model.py`) both use them, so an export folder needs no JAX to rebuild its modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

CONVNEXT_STAGES = 4


def _section(cfg: Any) -> Mapping[str, Any]:
  """A config section as a mapping, whether a dataclass or a dict-like (`ConfigDict`, JSON)."""
  if dataclasses.is_dataclass(cfg):
    return dataclasses.asdict(cfg)
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def llama_config_to_hf(cfg: Any) -> dict[str, Any]:
  """`model.llm` → keyword arguments of `transformers.LlamaConfig` describing the same architecture."""
  c = _section(cfg)
  return dict(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["mlp_dim"],
      num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
      head_dim=c["head_dim"], hidden_act="silu", max_position_embeddings=c["max_seq_len"],
      rms_norm_eps=c["rms_norm_eps"], tie_word_embeddings=c["tie_embeddings"],
      rope_parameters={"rope_type": "default", "rope_theta": float(c["rope_theta"])},
      attention_bias=False, mlp_bias=False)


def clip_vit_config_to_hf(cfg: Any) -> dict[str, Any]:
  """`model.vit` → keyword arguments of the matching `transformers.CLIPVisionConfig`."""
  c = _section(cfg)
  return dict(hidden_size=c["width"], intermediate_size=c["mlp_dim"], num_hidden_layers=c["depth"],
              num_attention_heads=c["num_heads"], num_channels=3, image_size=c["image_size"],
              patch_size=c["patch_size"], hidden_act="quick_gelu", layer_norm_eps=c["layer_norm_eps"],
              attention_dropout=0.0)


def convnext_config_to_hf(cfg: Any) -> dict[str, Any]:
  """`model.convnext` → keyword arguments of the matching `transformers.ConvNextConfig`.

  HF fixes the stem, block and downsampling norms' epsilon at 1e-6 and uses `layer_norm_eps` only for the final
  norm, so the two agree exactly when `layer_norm_eps` is 1e-6 (every config in configs/).
  """
  c = _section(cfg)
  return dict(num_channels=3, patch_size=4, num_stages=CONVNEXT_STAGES, hidden_sizes=list(c["dims"]),
              depths=list(c["depths"]), hidden_act="gelu", layer_norm_eps=c["layer_norm_eps"],
              layer_scale_init_value=c["layer_scale_init"], drop_path_rate=0.0, image_size=c["image_size"])


def sam_vit_config_to_hf(cfg: Any) -> dict[str, Any]:
  """`model.sam_vit` → keyword arguments of the matching `transformers.SamVisionConfig` (`num_pos_feats` belongs
  to the prompt encoder and is left to the caller)."""
  c = _section(cfg)
  return dict(hidden_size=c["width"], num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
              image_size=c["image_size"], patch_size=c["patch_size"], window_size=c["window_size"],
              global_attn_indexes=list(c["global_attn_indexes"]), output_channels=c["out_channels"],
              mlp_dim=c["mlp_dim"], layer_norm_eps=c.get("layer_norm_eps", 1e-6), hidden_act="gelu", qkv_bias=True,
              use_abs_pos=True, use_rel_pos=True, attention_dropout=0.0)


def sam_decoder_config_to_hf(cfg: Any) -> dict[str, Any]:
  """`model.mask_decoder` → keyword arguments of the matching `transformers.SamMaskDecoderConfig`."""
  c = _section(cfg)
  return dict(hidden_size=c["transformer_dim"], mlp_dim=c["mlp_dim"], num_hidden_layers=c["depth"],
              num_attention_heads=c["num_heads"], attention_downsample_rate=c["attention_downsample_rate"],
              num_multimask_outputs=c["num_multimask_outputs"], iou_head_depth=c["iou_head_depth"],
              iou_head_hidden_dim=c["iou_head_hidden_dim"], layer_norm_eps=c["layer_norm_eps"])
