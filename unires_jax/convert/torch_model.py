"""UniRES++ in PyTorch (the `torch` extra): runs a checkpoint written by `scripts/convert_to_pytorch.py` without JAX.

The LLM, the low-res ViT, the ConvNeXt and the SAM mask decoder are transformers modules (`LlamaForCausalLM`,
`CLIPVisionModel`, `ConvNextModel`, `SamMaskDecoder`); ROI Align, the vision flow, sequence assembly, the seg head,
the dynamic query attention and the dense neck are plain torch, written to the same definitions as
`unires_jax/models/`. `UniRESTorch.forward(batch)` is the teacher-forced forward of `UniRES.__call__`; its
state-dict names are the ones `unires_jax/convert/unires.py` documents. This module imports no JAX.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unires_jax.convert import hf_configs

TOKEN_TEXT, TOKEN_IMAGE, TOKEN_OBJECT, TOKEN_PART = 0, 1, 2, 3
GRANULARITIES = ("image", "object", "part")
NECK_NORM_EPS = 1e-6
HEADS_FILE = "unires.safetensors"


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
  """Two-layer exact-GELU MLP into the LLM width."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__()
    self.fc1 = nn.Linear(in_features, out_features)
    self.fc2 = nn.Linear(out_features, out_features)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class VisionFlow(nn.Module):
  """Image tokens from the ViT, object/part tokens ROI-pooled from one ConvNeXt stage, projected per granularity."""

  def __init__(self, flow: Mapping[str, Any], vit_width: int, region_channels: int, llm_width: int):
    super().__init__()
    self.flow = dict(flow)
    self.granularity_embedding = nn.Parameter(torch.zeros(len(GRANULARITIES), llm_width))
    self.image_projector = Projector(vit_width, llm_width)
    self.object_projector = Projector(region_channels + 6, llm_width)
    self.part_projector = Projector(region_channels + 6, llm_width)

  def region_tokens(self, features, boxes, box_mask, canvas_size: int):
    """[B, h, w, C] features, [B, N, 4] boxes → [B, N, C + 6] (mean ROI feature and normalised box geometry)."""
    pooled = roi_align(features, boxes, self.flow["roi_output_size"], features.shape[2] / canvas_size,
                       self.flow["sampling_ratio"]).mean(dim=(2, 3))  # [B, N, C]
    x0, y0, x1, y1 = (boxes / canvas_size).unbind(-1)
    geometry = torch.stack([x0, y0, x1, y1, x1 - x0, y1 - y0], dim=-1)  # [B, N, 6]
    return torch.cat([pooled, geometry], dim=-1) * box_mask[..., None].float()

  def forward(self, image_features, stage_features, object_boxes, object_box_mask, part_boxes, part_box_mask,
              canvas_size: int) -> dict[str, torch.Tensor]:
    tokens = {"image": image_features,
              "object": self.region_tokens(stage_features, object_boxes, object_box_mask, canvas_size),
              "part": self.region_tokens(stage_features, part_boxes, part_box_mask, canvas_size)}
    masks = {"image": None, "object": object_box_mask, "part": part_box_mask}
    out = {}
    for index, name in enumerate(GRANULARITIES):
      projected = getattr(self, f"{name}_projector")(tokens[name]) + self.granularity_embedding[index]
      if masks[name] is not None:
        projected = projected * masks[name][..., None].float()
      out[name] = projected  # [B, N_t, D]
    return out


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
    is_slot = token_type == type_id  # [B, L]
    rank = (is_slot.long().cumsum(dim=1) - 1).clamp(0, tokens.shape[1] - 1)  # [B, L]
    gathered = torch.gather(tokens, 1, rank[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, L, D]
    embeds = torch.where(is_slot[..., None], gathered.to(embeds.dtype), embeds)
  return embeds


def slot_attention_mask(attention_mask, token_type, box_masks: Mapping[int, torch.Tensor]):
  """The attention mask with slots of padded boxes switched off. [B, L] bool."""
  mask = attention_mask.bool()
  for type_id, box_mask in box_masks.items():
    is_slot = token_type == type_id
    rank = (is_slot.long().cumsum(dim=1) - 1).clamp(0, box_mask.shape[1] - 1)
    slot_valid = torch.gather(box_mask.bool(), 1, rank)
    mask = torch.where(is_slot, mask & slot_valid, mask)
  return mask


class UniRESTorch(nn.Module):
  """The assembled model; `model_config` is the run's `model` config section as a dict."""

  def __init__(self, model_config: Mapping[str, Any], llm: nn.Module | None = None,
               vision_tower: nn.Module | None = None):
    super().__init__()
    from transformers import CLIPVisionModel, ConvNextModel, LlamaForCausalLM
    cfg = self.config = dict(model_config)
    if cfg.get("dense_source", "convnext") != "convnext":
      raise ValueError(f"model.dense_source {cfg['dense_source']!r}: the PyTorch model supports 'convnext'")
    decoder_dim = cfg["mask_decoder"]["transformer_dim"]
    llm_width = cfg["llm"]["hidden_size"]
    self.llm = llm if llm is not None else LlamaForCausalLM(llama_hf_config(cfg["llm"]))
    self.vision_tower = vision_tower if vision_tower is not None else CLIPVisionModel(clip_hf_config(cfg["vit"]))
    self.vision_high = ConvNextModel(convnext_hf_config(cfg["convnext"]))
    dims = cfg["convnext"]["dims"]
    self.vision_flow = VisionFlow(cfg["vision_flow"], cfg["vit"]["width"],
                                  dims[cfg["vision_flow"]["roi_feature_stage"]], llm_width)
    self.seg_head = SegHead(llm_width, decoder_dim)
    self.visual_key_proj = nn.Linear(llm_width, decoder_dim)
    self.dynamic_query = DynamicQuery(decoder_dim, cfg["mask_decoder"]["num_heads"])
    self.dense_neck = DenseNeck(dims[cfg["dense_feature_stage"]], decoder_dim)
    self.sam = SamDecoder(cfg["mask_decoder"])

  @classmethod
  def from_exported(cls, directory: str) -> "UniRESTorch":
    """Loads `OUT/` of `scripts/convert_to_pytorch.py`: `llm/`, `vision_tower/`, `unires.safetensors`,
    `config.json`. Every tensor of the heads file must be a parameter here and vice versa."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel, LlamaForCausalLM

    with open(os.path.join(directory, "config.json")) as f:
      model_config = json.load(f)["model"]
    llm = LlamaForCausalLM.from_pretrained(os.path.join(directory, "llm"), attn_implementation="eager")
    tower = CLIPVisionModel.from_pretrained(os.path.join(directory, "vision_tower"), attn_implementation="eager")
    model = cls(model_config, llm=llm, vision_tower=tower)
    heads = load_file(os.path.join(directory, HEADS_FILE))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    if unexpected:
      raise KeyError(f"{HEADS_FILE}: tensor {unexpected[0]!r} is not a parameter of UniRESTorch")
    missing = [n for n in missing if not n.startswith(("llm.", "vision_tower."))]
    if missing:
      raise KeyError(f"{HEADS_FILE}: parameter {missing[0]!r} is missing ({len(missing)} missing)")
    return model.eval()

  def encode_vision(self, batch) -> dict[str, Any]:
    cfg = self.config
    select = cfg["vit"].get("select_layer", -2) % (cfg["vit"]["depth"] + 1)
    vit_out = self.vision_tower(pixel_values=batch["image_low"].permute(0, 3, 1, 2), output_hidden_states=True)
    image_features = vit_out.hidden_states[select][:, 1:]  # [B, Ni, Dv], class token dropped
    convnext_out = self.vision_high(pixel_values=batch["image_high"].permute(0, 3, 1, 2), output_hidden_states=True)
    stages = [h.permute(0, 2, 3, 1) for h in convnext_out.hidden_states[1:]]  # 4 × [B, h, w, C]
    canvas = cfg["convnext"]["image_size"]
    groups = self.vision_flow(image_features, stages[cfg["vision_flow"]["roi_feature_stage"]], batch["object_boxes"],
                              batch["object_box_mask"], batch["part_boxes"], batch["part_box_mask"], canvas)
    return {"groups": groups, "dense": self.dense_neck(stages[cfg["dense_feature_stage"]])}

  def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher-forced forward on a DESIGN.md batch (torch tensors) → logits, mask_logits, iou_pred."""
    vision = self.encode_vision(batch)
    token_type = batch["token_type"]
    groups = vision["groups"]
    embeds = self.llm.get_input_embeddings()(batch["input_ids"].long())  # [B, L, D]
    embeds = insert_visual_tokens(embeds, token_type, {TOKEN_IMAGE: groups["image"], TOKEN_OBJECT: groups["object"],
                                                       TOKEN_PART: groups["part"]})
    mask = slot_attention_mask(batch["attention_mask"], token_type,
                               {TOKEN_OBJECT: batch["object_box_mask"], TOKEN_PART: batch["part_box_mask"]})
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # real tokens before each slot, as the JAX LLM
    hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
                            use_cache=False).last_hidden_state  # [B, L, D]
    logits = self.llm.lm_head(hidden).float()  # [B, L, V]
    seg_index = batch["seg_index"].long()
    seg_hidden = torch.gather(hidden, 1, seg_index[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]  # [B, D]
    seg_prompt = self.seg_head(seg_hidden)[:, None]  # [B, 1, Cd]
    is_visual = (token_type > TOKEN_TEXT) & mask
    dynamic_prompt = self.dynamic_query(seg_prompt, self.visual_key_proj(hidden), is_visual)  # [B, 1, Cd]
    masks, iou = self.sam(vision["dense"], torch.cat([seg_prompt, dynamic_prompt], dim=1))  # [B, 4h, 4w], [B]
    size = self.config["convnext"]["image_size"]
    mask_logits = F.interpolate(masks[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return {"logits": logits, "mask_logits": mask_logits[:, 0], "iou_pred": iou.float()}
