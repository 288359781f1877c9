"""UniRES++ assembled: vision flow → granularity-aware token sequence → LLM → [SEG] → mask decoder.

`UniRES.__call__(batch)` is the teacher-forced forward used for training and scoring (batch keys in
docs/DESIGN.md). Generation (KV cache) and mask decoding from generated `[SEG]` tokens live in
`unires_jax/eval/inference.py`, which uses the methods here (`encode_vision`, `embed_sequence`, `run_llm`,
`decode_masks`).

[interpretation] "Dynamic feature exploitation": the `[SEG]` prompt cross-attends to the LLM's final hidden
states at the image/object/part slots (the multi-granularity features after the LLM has read the phrase); the
result is a second sparse prompt token for the SAM-style decoder beside the `[SEG]` prompt itself. Dense
features for the decoder come from a ConvNeXt stage through a SAM-style neck (1×1 conv, LN, 3×3 conv, LN), or,
with `model.dense_source = "sam_vit"`, from SAM's ViT encoder on `image_high` (its own neck already ends in
`out_channels`, fed to the decoder as is when that equals the decoder width, else through a 1×1 projection).

LISA is this model with parts switched off (`configs/lisa.py`): `model.dynamic_query = False` (the `[SEG]` prompt is
the only sparse prompt; no visual key projection, no dynamic query), no object or part slots and the SAM ViT dense
source, so the ConvNeXt is not built (`UniRESConfig.uses_convnext`); its `image_size` still sets the high-res canvas.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from unires_jax.sharding import logical_init
from unires_jax.pixel_stats import CLIP_MEAN, CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from unires_jax.models.clip_vit import ClipVisionTransformer, ClipVitConfig
from unires_jax.models.convnext import ConvNeXt, ConvNextConfig
from unires_jax.models.layers import logical_conv, logical_dense, logical_layer_norm
from unires_jax.models.llm import Llama, LlamaConfig
from unires_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from unires_jax.models.sam_vit import SamVisionEncoder, SamVitConfig
from unires_jax.models.vision_flow import MultiGranularityVisionFlow, VisionFlowConfig

TOKEN_TEXT, TOKEN_IMAGE, TOKEN_OBJECT, TOKEN_PART = 0, 1, 2, 3
DENSE_SOURCES = ("convnext", "sam_vit")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class UniRESConfig:
  vit: ClipVitConfig
  convnext: ConvNextConfig
  vision_flow: VisionFlowConfig
  llm: LlamaConfig
  mask_decoder: MaskDecoderConfig
  dense_source: str = "convnext"
  dense_feature_stage: int = 2
  dtype: str = "float32"
  param_dtype: str = "float32"
  sam_vit: SamVitConfig | None = None  # model.sam_vit; used when dense_source == "sam_vit"
  dynamic_query: bool = True  # False: the [SEG] prompt alone is the sparse prompt (LISA)

  @property
  def uses_convnext(self) -> bool:
    """The high-res ConvNeXt feeds the region tokens and/or the dense features; without either it is not built."""
    return self.vision_flow.uses_region_tokens or self.dense_source == "convnext"

  @property
  def num_image_tokens(self) -> int:
    return (self.vit.image_size // self.vit.patch_size) ** 2

  @property
  def high_res_size(self) -> int:
    return self.convnext.image_size

  def inert_parameter_patterns(self) -> tuple[str, ...]:
    """Regexes of parameters that exist for checkpoint compatibility but cannot change this model's losses.

    The trainer freezes them (`train.freeze_inert`), so no optimizer state is spent on them and Adam does not
    drift them on round-off gradients:
    - attention key biases: softmax is invariant to a per-query constant, so their exact gradient is zero;
    - CLIP's `post_layernorm` (features come from `select_layer`);
    - SAM's IoU head and the multimask hypernetworks (single-mask output; no IoU loss, as in LISA);
    - ConvNeXt stages after the last one used (ROI features and dense features) and its pooled head norm.
    """
    patterns = [r".*/(k_proj|key)/bias", r"vision_low/post_layernorm/.*", r"mask_decoder/iou_prediction_head/.*",
                r"mask_decoder/output_hypernetworks_mlps_([1-9]|[1-9][0-9]+)/.*", r"vision_high/head_norm/.*"]
    last_stage = self.vision_flow.roi_feature_stage
    if self.dense_source == "convnext":
      last_stage = max(last_stage, self.dense_feature_stage)
    patterns += [rf"vision_high/stage_{stage}/.*" for stage in range(last_stage + 1, 4)]
    return tuple(patterns)

  @classmethod
  def from_config(cls, model_cfg: Any) -> "UniRESConfig":
    """From the `model` ConfigDict section; unknown or missing keys fail with their names."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    known = {"size", "vit", "convnext", "vision_flow", "llm", "mask_decoder", "dense_source", "dense_feature_stage",
             "dtype", "param_dtype", "sam_vit", "dynamic_query"}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise KeyError(f"model config: unknown key(s) {unknown}; expected some of {sorted(known)}")
    sections = {"vit": ClipVitConfig, "convnext": ConvNextConfig, "vision_flow": VisionFlowConfig,
                "llm": LlamaConfig, "mask_decoder": MaskDecoderConfig}
    built = {}
    for name, section_cls in sections.items():
      if name not in cfg:
        raise KeyError(f"model config: section {name!r} is missing")
      try:
        built[name] = section_cls(**cfg[name])
      except TypeError as e:
        raise KeyError(f"model.{name}: {e}") from e
    if cfg.get("dense_source", "convnext") not in DENSE_SOURCES:
      raise ValueError(f"model.dense_source {cfg['dense_source']!r}: expected one of {DENSE_SOURCES}")
    for key in ("dtype", "param_dtype"):
      if cfg.get(key, "float32") not in DTYPES:
        raise ValueError(f"model.{key} {cfg[key]!r}: expected one of {sorted(DTYPES)}")
    stage = cfg.get("dense_feature_stage", 2)
    if not 0 <= stage <= 3:
      raise ValueError(f"model.dense_feature_stage must be a ConvNeXt stage 0..3, got {stage}")
    if "sam_vit" in cfg:
      try:
        built["sam_vit"] = SamVitConfig(**cfg["sam_vit"])
      except TypeError as e:
        raise KeyError(f"model.sam_vit: {e}") from e
    if cfg.get("dense_source", "convnext") == "sam_vit":
      if "sam_vit" not in built:
        raise KeyError("model config: dense_source 'sam_vit' needs the section 'sam_vit'")
      if built["sam_vit"].image_size != built["convnext"].image_size:
        raise ValueError(f"model.sam_vit.image_size {built['sam_vit'].image_size} must equal "
                         f"model.convnext.image_size {built['convnext'].image_size}: the SAM encoder reads image_high")
    return cls(dense_source=cfg.get("dense_source", "convnext"), dense_feature_stage=stage,
               dynamic_query=bool(cfg.get("dynamic_query", True)),
               dtype=cfg.get("dtype", "float32"), param_dtype=cfg.get("param_dtype", "float32"), **built)


# SAM's pixel statistics (0..255 scale); the pipeline normalises with CLIP's.


def clip_to_sam_normalisation(image):
  """CLIP-normalised canvas [B, S, S, 3] → SAM-normalised, so pretrained SAM encoders see their own statistics.

  The zero padding of the canvas stays zero, as in SAM's own preprocessing (pad after normalising); a real pixel
  exactly at CLIP's mean in all three channels is indistinguishable from padding and is treated as such.
  """
  clip_mean = jnp.asarray(CLIP_MEAN, image.dtype)
  clip_std = jnp.asarray(CLIP_STD, image.dtype)
  pixels = (image * clip_std + clip_mean) * 255.0  # [B, S, S, 3] in 0..255
  sam = (pixels - jnp.asarray(SAM_PIXEL_MEAN, image.dtype)) / jnp.asarray(SAM_PIXEL_STD, image.dtype)
  is_padding = jnp.all(image == 0, axis=-1, keepdims=True)
  return jnp.where(is_padding, 0.0, sam).astype(image.dtype)


def _slot_rank(token_type, type_id: int, count: int):
  """(is_slot [B, L], rank [B, L]): where type `type_id` slots are, and which of the `count` items each takes."""
  is_slot = token_type == type_id
  return is_slot, jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, count - 1)


def insert_visual_tokens(text_embeds, token_type, groups: Mapping[int, jnp.ndarray]):
  """Writes each visual group into its slots: the k-th slot of type t receives groups[t][:, k].

  text_embeds [B, L, D]; token_type [B, L]; groups {type: [B, N_t, D]} → [B, L, D].
  """
  embeds = text_embeds
  for type_id, tokens in groups.items():
    is_slot, slot_rank = _slot_rank(token_type, type_id, tokens.shape[1])  # [B, L], [B, L]
    gathered = jnp.take_along_axis(tokens, slot_rank[..., None], axis=1)  # [B, L, D]
    embeds = jnp.where(is_slot[..., None], gathered.astype(embeds.dtype), embeds)
  return embeds


def slot_attention_mask(attention_mask, token_type, box_masks: Mapping[int, jnp.ndarray]):
  """The batch's attention mask with slots of padded boxes switched off. [B, L] bool."""
  mask = attention_mask.astype(bool)
  for type_id, box_mask in box_masks.items():
    is_slot, slot_rank = _slot_rank(token_type, type_id, box_mask.shape[1])
    slot_valid = jnp.take_along_axis(box_mask.astype(bool), slot_rank, axis=1)
    mask = jnp.where(is_slot, mask & slot_valid, mask)
  return mask


class DenseNeck(nn.Module):
  """SAM-style neck: ConvNeXt stage features [B, h, w, C] → decoder width [B, h, w, Cd]."""
  out_channels: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = logical_conv(self.out_channels, 1, "conv1", **kinds)(x)
    x = logical_layer_norm("norm1", **kinds)(x)
    x = logical_conv(self.out_channels, 3, "conv2", **kinds)(x)
    return logical_layer_norm("norm2", **kinds)(x)


class SegHead(nn.Module):
  """The `[SEG]` hidden state → the mask decoder's prompt space (LISA's text_hidden_fcs)."""
  hidden: int
  out: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(logical_dense(self.hidden, ("embed", "mlp"), "fc1", **kinds)(x))
    return logical_dense(self.out, ("mlp", "embed"), "fc2", **kinds)(x)


class UniRES(nn.Module):
  config: UniRESConfig

  def setup(self):
    cfg = self.config
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    decoder_dim = cfg.mask_decoder.transformer_dim
    self.vision_low = ClipVisionTransformer(cfg.vit, dtype=dtype, param_dtype=param_dtype)
    if cfg.uses_convnext:
      self.vision_high = ConvNeXt(cfg.convnext, dtype=dtype, param_dtype=param_dtype)
    self.vision_flow = MultiGranularityVisionFlow(cfg.vision_flow, llm_width=cfg.llm.hidden_size, dtype=dtype,
                                                  param_dtype=param_dtype)
    self.llm = Llama(cfg.llm, dtype=dtype, param_dtype=param_dtype)
    self.seg_head = SegHead(cfg.llm.hidden_size, decoder_dim, dtype=dtype, param_dtype=param_dtype)
    if cfg.dynamic_query:
      self.visual_key_proj = logical_dense(decoder_dim, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype)
      self.dynamic_query = nn.MultiHeadDotProductAttention(
          num_heads=cfg.mask_decoder.num_heads, qkv_features=decoder_dim, out_features=decoder_dim, dtype=dtype,
          param_dtype=param_dtype,
          kernel_init=logical_init(nn.initializers.lecun_normal(), ("embed", "heads", "head_dim")),
          out_kernel_init=logical_init(nn.initializers.lecun_normal(), ("heads", "head_dim", "embed")))
    if cfg.dense_source == "sam_vit":
      self.sam_vit = SamVisionEncoder(cfg.sam_vit, dtype=dtype, param_dtype=param_dtype)
      if cfg.sam_vit.out_channels != decoder_dim:
        self.sam_dense_proj = logical_dense(decoder_dim, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype)
    else:
      self.dense_neck = DenseNeck(decoder_dim, dtype=dtype, param_dtype=param_dtype)
    self.mask_decoder = MaskDecoder(cfg.mask_decoder, dtype=dtype, param_dtype=param_dtype)

  # --- pieces, also used by inference -------------------------------------------------------------------------
  def encode_vision(self, batch) -> dict[str, jnp.ndarray]:
    """Visual token groups for the LLM and dense features for the mask decoder."""
    cfg = self.config
    image_high = batch["image_high"]
    if image_high.shape[1:3] != (cfg.high_res_size, cfg.high_res_size):
      raise ValueError(f"image_high has spatial size {image_high.shape[1:3]}, the config expects "
                       f"{cfg.high_res_size}×{cfg.high_res_size} (model.convnext.image_size)")
    if batch["image_low"].shape[1:3] != (cfg.vit.image_size, cfg.vit.image_size):
      raise ValueError(f"image_low has spatial size {batch['image_low'].shape[1:3]}, the config expects "
                       f"{cfg.vit.image_size}×{cfg.vit.image_size} (model.vit.image_size)")
    image_features = self.vision_low(batch["image_low"])  # [B, Ni, Dv]
    high_res_features = self.vision_high(image_high) if cfg.uses_convnext else None  # 4 × [B, h, w, C]
    groups = self.vision_flow(image_features, high_res_features, batch["object_boxes"], batch["object_box_mask"],
                              batch["part_boxes"], batch["part_box_mask"], canvas_size=cfg.high_res_size)
    if cfg.dense_source == "sam_vit":
      # SAM's neck output goes to the decoder as in SAM; a 1×1 projection only when the widths differ.
      dense = self.sam_vit(clip_to_sam_normalisation(image_high))  # [B, S_h/p, S_h/p, out_channels]
      if cfg.sam_vit.out_channels != cfg.mask_decoder.transformer_dim:
        dense = self.sam_dense_proj(dense)  # [B, h, w, Cd]
    else:
      dense = self.dense_neck(high_res_features[cfg.dense_feature_stage])  # [B, h, w, Cd]
    return {"groups": groups, "dense": dense}

  def embed_sequence(self, input_ids, token_type, attention_mask, vision, object_box_mask, part_box_mask):
    """Token embeddings with the visual groups in their slots, and the attention mask. [B, L, D], [B, L]."""
    embeds = self.llm.embed(input_ids)
    groups = vision["groups"]
    embeds = insert_visual_tokens(embeds, token_type, {TOKEN_IMAGE: groups["image"], TOKEN_OBJECT: groups["object"],
                                                       TOKEN_PART: groups["part"]})
    mask = slot_attention_mask(attention_mask, token_type, {TOKEN_OBJECT: object_box_mask, TOKEN_PART: part_box_mask})
    return embeds, mask

  def run_llm(self, embeds, attention_mask, positions=None, decode: bool = False):
    return self.llm(embeds, attention_mask, positions, decode=decode)

  def lm_logits(self, hidden):
    return self.llm.logits(hidden)

  def decode_masks(self, seg_hidden, sequence_hidden, token_type, attention_mask, dense):
    """seg_hidden [B, D] → mask logits on the S_h canvas [B, S_h, S_h] and IoU prediction [B]."""
    seg_prompt = self.seg_head(seg_hidden)[:, None, :]  # [B, 1, Cd]
    sparse = seg_prompt
    if self.config.dynamic_query:
      visual_keys = self.visual_key_proj(sequence_hidden)  # [B, L, Cd]
      is_visual = (token_type > TOKEN_TEXT) & attention_mask  # [B, L]
      dynamic_prompt = self.dynamic_query(seg_prompt, visual_keys, mask=is_visual[:, None, None, :])  # [B, 1, Cd]
      sparse = jnp.concatenate([seg_prompt, dynamic_prompt], axis=1)  # [B, 2, Cd]
    masks, iou_pred = self.mask_decoder(dense, sparse, multimask_output=False)  # [B, 1, 4h, 4w], [B, 1]
    size = self.config.high_res_size
    mask_logits = jax.image.resize(masks[:, 0].astype(jnp.float32), (masks.shape[0], size, size), "bilinear")
    return mask_logits, iou_pred[:, 0].astype(jnp.float32)

  # --- the teacher-forced forward --------------------------------------------------------------------------------
  def __call__(self, batch, train: bool = False) -> dict[str, jnp.ndarray]:
    del train  # no dropout in this model; kept for the train/eval call signature
    seq_len = batch["input_ids"].shape[1]
    if seq_len > self.config.llm.max_seq_len:
      raise ValueError(f"sequence length {seq_len} exceeds model.llm.max_seq_len={self.config.llm.max_seq_len}")
    vision = self.encode_vision(batch)
    embeds, mask = self.embed_sequence(batch["input_ids"], batch["token_type"], batch["attention_mask"], vision,
                                       batch["object_box_mask"], batch["part_box_mask"])
    hidden = self.run_llm(embeds, mask)  # [B, L, D]
    logits = self.lm_logits(hidden)  # [B, L, V]
    seg_hidden = jnp.take_along_axis(hidden, batch["seg_index"][:, None, None], axis=1)[:, 0]  # [B, D]
    mask_logits, iou_pred = self.decode_masks(seg_hidden, hidden, batch["token_type"], mask, vision["dense"])
    return {"logits": logits, "mask_logits": mask_logits, "iou_pred": iou_pred}


def build_model(model_cfg: Any) -> "UniRES":
  """The model a config's `model` section describes."""
  return UniRES(UniRESConfig.from_config(model_cfg))
