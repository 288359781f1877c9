"""The building blocks of `convert/torch_model.py`, in plain torch and transformers modules, without JAX.

Each is written to the definition of its JAX counterpart in `unires_jax/models/` (ROI Align and the vision flow,
the seg head, the dynamic query attention, the dense neck, SAM's dense prompt pieces, SAM's pixel statistics), under
the state-dict names `convert/unires.py` documents. The transformers configs come from `convert/hf_configs.py`.
"""

from __future__ import annotations

import types
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unires_jax.convert import hf_configs
from unires_jax.pixel_stats import CLIP_MEAN, CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD

TOKEN_TEXT, TOKEN_IMAGE, TOKEN_OBJECT, TOKEN_PART = 0, 1, 2, 3
GRANULARITIES = ("image", "object", "part")
NECK_NORM_EPS = 1e-6
# SAM's pixel statistics (0..255 scale), as `unires_jax/models/unires.py`.


# --- transformers configs from the `model` config section (convert/hf_configs.py) ---------------------------------
def llama_hf_config(llm: Mapping[str, Any]):
  from transformers import LlamaConfig
  return LlamaConfig(**hf_configs.llama_config_to_hf(llm), attn_implementation="eager")


def clip_hf_config(vit: Mapping[str, Any]):
  from transformers import CLIPVisionConfig
  return CLIPVisionConfig(**hf_configs.clip_vit_config_to_hf(vit), attn_implementation="eager")


def convnext_hf_config(convnext: Mapping[str, Any]):
  from transformers import ConvNextConfig
  return ConvNextConfig(**hf_configs.convnext_config_to_hf(convnext))


def sam_decoder_hf_config(decoder: Mapping[str, Any]):
  from transformers import SamMaskDecoderConfig
  config = SamMaskDecoderConfig(**hf_configs.sam_decoder_config_to_hf(decoder))
  config._attn_implementation = "eager"  # the decoder is used standalone, outside a SamModel that would set it
  return config


# --- ROI Align ---------------------------------------------------------------------------------------------------------
def _axis_weights(start, bin_size, num_bins: int, sampling_ratio: int, length: int):
  """Mean bilinear weights of each bin's samples along one axis (torchvision's border rules): [B, N, nb, length]."""
  bins = torch.arange(num_bins, dtype=torch.float32)
  steps = (torch.arange(sampling_ratio, dtype=torch.float32) + 0.5) / sampling_ratio
  offsets = bins[:, None] + steps[None, :]  # [nb, s]
  coords = start[..., None, None] + offsets * bin_size[..., None, None]  # [B, N, nb, s]
  inside = (coords >= -1.0) & (coords <= length)
  clamped = coords.clamp(min=0.0)
  low = clamped.floor().long()
  at_last = low >= length - 1
  low = torch.where(at_last, torch.full_like(low, length - 1), low)
  high = torch.where(at_last, torch.full_like(low, length - 1), low + 1)
  frac = torch.where(at_last, torch.zeros_like(clamped), clamped - low.float())
  weights = ((1.0 - frac)[..., None] * F.one_hot(low, length).float()
             + frac[..., None] * F.one_hot(high, length).float())  # [B, N, nb, s, length]
  return (weights * inside[..., None]).mean(dim=-2)


def roi_align(features, boxes, output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool = True):
  """features [B, H, W, C], boxes [B, N, 4] (x0, y0, x1, y1) → [B, N, o, o, C] (torchvision `roi_align` values)."""
  _, height, width, _ = features.shape
  scaled = boxes.float() * spatial_scale - (0.5 if aligned else 0.0)
  x0, y0, x1, y1 = scaled.unbind(-1)
  roi_w, roi_h = x1 - x0, y1 - y0
  if not aligned:
    roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
  weights_y = _axis_weights(y0, roi_h / output_size, output_size, sampling_ratio, height)  # [B, N, o, H]
  weights_x = _axis_weights(x0, roi_w / output_size, output_size, sampling_ratio, width)  # [B, N, o, W]
  rows = torch.einsum("bnyh,bhwc->bnywc", weights_y, features.float())  # [B, N, o, W, C]
  return torch.einsum("bnywc,bnxw->bnyxc", rows, weights_x).to(features.dtype)  # [B, N, o, o, C]


# --- UniRES-only modules -----------------------------------------------------------------------------------------------
class Projector(nn.Module):
  """Two-layer exact-GELU MLP into the LLM width (`mlp2x_gelu`)."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__()
    self.fc1 = nn.Linear(in_features, out_features)
    self.fc2 = nn.Linear(out_features, out_features)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class LinearProjector(nn.Module):
  """One Linear into the LLM width (`linear`, LLaVA-1's and LISA's `mm_projector`)."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__()
    self.fc = nn.Linear(in_features, out_features)

  def forward(self, x):
    return self.fc(x)


PROJECTORS = {"mlp2x_gelu": Projector, "linear": LinearProjector}


def uses_region_tokens(flow: Mapping[str, Any]) -> bool:
  return flow["max_object_boxes"] > 0 or flow["max_part_boxes"] > 0


class VisionFlow(nn.Module):
  """Image tokens from the ViT, object/part tokens ROI-pooled from one ConvNeXt stage, projected per granularity.

  Without object and part slots (LISA) only the image projector exists and the region groups are empty."""

  def __init__(self, flow: Mapping[str, Any], vit_width: int, region_channels: int | None, llm_width: int):
    super().__init__()
    self.flow = dict(flow)
    self.llm_width = llm_width
    projector = PROJECTORS[self.flow.get("projector", "mlp2x_gelu")]
    if self.flow.get("granularity_embedding", True):
      self.granularity_embedding = nn.Parameter(torch.zeros(len(GRANULARITIES), llm_width))
    else:
      self.granularity_embedding = None
    self.image_projector = projector(vit_width, llm_width)
    self.region_groups = uses_region_tokens(self.flow)
    if self.region_groups:
      self.object_projector = projector(region_channels + 6, llm_width)
      self.part_projector = projector(region_channels + 6, llm_width)

  def region_tokens(self, features, boxes, box_mask, canvas_size: int):
    """[B, h, w, C] features, [B, N, 4] boxes → [B, N, C + 6] (mean ROI feature and normalised box geometry)."""
    pooled = roi_align(features, boxes, self.flow["roi_output_size"], features.shape[2] / canvas_size,
                       self.flow["sampling_ratio"]).mean(dim=(2, 3))  # [B, N, C]
    x0, y0, x1, y1 = (boxes / canvas_size).unbind(-1)
    geometry = torch.stack([x0, y0, x1, y1, x1 - x0, y1 - y0], dim=-1)  # [B, N, 6]
    return torch.cat([pooled, geometry], dim=-1) * box_mask[..., None].to(pooled.dtype)

  def forward(self, image_features, stage_features, object_boxes, object_box_mask, part_boxes, part_box_mask,
              canvas_size: int) -> dict[str, torch.Tensor]:
    tokens = {"image": image_features}
    if self.region_groups:
      tokens["object"] = self.region_tokens(stage_features, object_boxes, object_box_mask, canvas_size)
      tokens["part"] = self.region_tokens(stage_features, part_boxes, part_box_mask, canvas_size)
    masks = {"image": None, "object": object_box_mask, "part": part_box_mask}
    out = {}
    for index, name in enumerate(GRANULARITIES):
      if name not in tokens:
        out[name] = image_features.new_zeros((image_features.shape[0], 0, self.llm_width))
        continue
      projected = getattr(self, f"{name}_projector")(tokens[name])
      if self.granularity_embedding is not None:
        projected = projected + self.granularity_embedding[index]
      if masks[name] is not None:
        projected = projected * masks[name][..., None].to(projected.dtype)
      out[name] = projected  # [B, N_t, D]
    return out


def clip_to_sam_normalisation(image):
  """CLIP-normalised canvas [B, S, S, 3] → SAM-normalised, the zero padding kept zero (`models/unires.py`)."""
  clip_mean = image.new_tensor(CLIP_MEAN)
  clip_std = image.new_tensor(CLIP_STD)
  pixels = (image * clip_std + clip_mean) * 255.0  # [B, S, S, 3] in 0..255
  sam = (pixels - image.new_tensor(SAM_PIXEL_MEAN)) / image.new_tensor(SAM_PIXEL_STD)
  is_padding = (image == 0).all(dim=-1, keepdim=True)
  return torch.where(is_padding, torch.zeros_like(sam), sam)


def sam_vision_encoder(sam_vit: Mapping[str, Any]) -> nn.Module:
  """transformers' `SamVisionEncoder` for the `model.sam_vit` section (names as `convert/sam_vit.py`, no prefix)."""
  from transformers import SamVisionConfig
  from transformers.models.sam.modeling_sam import SamVisionEncoder

  config = SamVisionConfig(**hf_configs.sam_vit_config_to_hf(sam_vit))
  config._attn_implementation = "eager"
  return SamVisionEncoder(config)


class SegHead(nn.Module):
  """`[SEG]` hidden state → the mask decoder's prompt width."""

  def __init__(self, hidden: int, out: int):
    super().__init__()
    self.fc1 = nn.Linear(hidden, hidden)
    self.fc2 = nn.Linear(hidden, out)

  def forward(self, x):
    return self.fc2(F.relu(self.fc1(x)))


class DynamicQuery(nn.Module):
  """Multi-head attention of the `[SEG]` prompt over the visual slots' hidden states (Flax MHA semantics)."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

  def forward(self, query, keys, key_mask):
    """query [B, Q, C], keys [B, L, C], key_mask [B, L] bool → [B, Q, C]."""
    split = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, H, T, Dh]
    q, k, v = split(self.q_proj(query)), split(self.k_proj(keys)), split(self.v_proj(keys))
    logits = torch.einsum("bhqd,bhkd->bhqk", q / q.shape[-1] ** 0.5, k)
    logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
    attended = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(dim=-1), v)
    return self.out_proj(attended.transpose(1, 2).flatten(2))


class DenseNeck(nn.Module):
  """1×1 conv, LayerNorm, 3×3 conv, LayerNorm (channel-last norms): ConvNeXt stage → decoder width."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    self.norm1 = nn.LayerNorm(out_channels, eps=NECK_NORM_EPS)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
    self.norm2 = nn.LayerNorm(out_channels, eps=NECK_NORM_EPS)

  def forward(self, x):  # [B, h, w, C] → [B, h, w, Cd]
    x = self.norm1(self.conv1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    return self.norm2(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class DensePromptEncoder(nn.Module):
  """SAM's grid positional encoding (`shared_embedding`) and the no-mask dense prompt."""

  def __init__(self, width: int):
    super().__init__()
    from transformers.models.sam.modeling_sam import SamPositionalEmbedding
    self.shared_embedding = SamPositionalEmbedding(types.SimpleNamespace(scale=1.0, num_pos_feats=width // 2))
    self.no_mask_embed = nn.Embedding(1, width)

  def forward(self, height: int, width: int):
    """(positional encoding [C, h, w] at pixel centres, dense prompt [C])."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, 2] as (x, y)
    return self.shared_embedding(grid).permute(2, 0, 1), self.no_mask_embed.weight[0]


class SamDecoder(nn.Module):
  """transformers' `SamMaskDecoder` with the dense prompt pieces, under SamModel's names."""

  def __init__(self, decoder: Mapping[str, Any]):
    super().__init__()
    from transformers.models.sam.modeling_sam import SamMaskDecoder
    self.mask_decoder = SamMaskDecoder(sam_decoder_hf_config(decoder))
    self.prompt_encoder = DensePromptEncoder(decoder["transformer_dim"])

  def forward(self, dense, sparse):
    """dense [B, h, w, C], sparse [B, Q, C] → single-mask logits [B, 4h, 4w] and IoU prediction [B]."""
    batch, height, width, _ = dense.shape
    image_pe, no_mask = self.prompt_encoder(height, width)
    dense_prompt = no_mask.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
    masks, iou = self.mask_decoder(image_embeddings=dense.permute(0, 3, 1, 2),
                                   image_positional_embeddings=image_pe[None].expand(batch, -1, -1, -1),
                                   sparse_prompt_embeddings=sparse[:, None], dense_prompt_embeddings=dense_prompt,
                                   multimask_output=False)[:2]
    return masks[:, 0, 0], iou[:, 0, 0]


# --- sequence assembly ------------------------------------------------------------------------------------------------
def insert_visual_tokens(embeds, token_type, groups: Mapping[int, torch.Tensor]):
  """The k-th slot of type t receives groups[t][:, k]. embeds [B, L, D] → [B, L, D]."""
  for type_id, tokens in groups.items():
    if tokens.shape[1] == 0:  # no slots of this granularity
      continue
    is_slot = token_type == type_id  # [B, L]
    rank = (is_slot.long().cumsum(dim=1) - 1).clamp(0, tokens.shape[1] - 1)  # [B, L]
    gathered = torch.gather(tokens, 1, rank[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, L, D]
    embeds = torch.where(is_slot[..., None], gathered.to(embeds.dtype), embeds)
  return embeds


def slot_attention_mask(attention_mask, token_type, box_masks: Mapping[int, torch.Tensor]):
  """The attention mask with slots of padded boxes switched off. [B, L] bool."""
  mask = attention_mask.bool()
  for type_id, box_mask in box_masks.items():
    if box_mask.shape[1] == 0:
      continue
    is_slot = token_type == type_id
    rank = (is_slot.long().cumsum(dim=1) - 1).clamp(0, box_mask.shape[1] - 1)
    slot_valid = torch.gather(box_mask.bool(), 1, rank)
    mask = torch.where(is_slot, mask & slot_valid, mask)
  return mask




class LoraLinear(nn.Module):
  """A Linear with its LoRA factors kept apart: `base(x) + scale · (x Aᵀ) Bᵀ` (PEFT's `lora_A`, `lora_B` layout)."""

  def __init__(self, base: nn.Linear, lora_a, lora_b, scale: float):
    super().__init__()
    if lora_a.shape[1] != base.in_features or lora_b.shape[0] != base.out_features:
      raise ValueError(f"LoRA factors A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit a Linear "
                       f"{base.in_features} → {base.out_features}")
    self.base = base
    self.lora_A = nn.Parameter(lora_a.to(base.weight.dtype), requires_grad=False)  # [r, in]
    self.lora_B = nn.Parameter(lora_b.to(base.weight.dtype), requires_grad=False)  # [out, r]
    self.scale = scale

  def forward(self, x):
    return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
