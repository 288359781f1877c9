"""UniRES++ in PyTorch (the `torch` extra): runs an export (`convert/export.py`) without JAX.

The LLM, the low-res ViT, the ConvNeXt, SAM's ViT and SAM's mask decoder are transformers modules
(`LlamaForCausalLM`, `CLIPVisionModel`, `ConvNextModel`, `SamVisionEncoder`, `SamMaskDecoder`); the rest is plain
torch (`convert/torch_layers.py`), written to the same definitions as `unires_jax/models/`. The config's switches
(`vision_flow.projector`, `granularity_embedding`, object/part slots, `dense_source`, `dynamic_query`) build the same
variants as the JAX model, LISA's among them. `UniRESTorch.forward(batch)` is the teacher-forced forward of
`UniRES.__call__`; `generate` and `predict` (`convert/torch_generate.py`) are greedy decoding with the KV cache and
a mask per generated `[SEG]`, as `unires_jax/eval/inference.py`. State-dict names are the ones
`unires_jax/convert/unires.py` documents. This module imports no JAX.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unires_jax.convert import shards
from unires_jax.convert.export_files import CONFIG_FILE, HEADS_PREFIX, LORA_FILE
from unires_jax.convert.torch_layers import (  # noqa: F401  (roi_align and the token ids are re-exported)
    TOKEN_IMAGE, TOKEN_OBJECT, TOKEN_PART, TOKEN_TEXT, DenseNeck, DynamicQuery, LoraLinear, SamDecoder, SegHead,
    VisionFlow, clip_hf_config, clip_to_sam_normalisation, convnext_hf_config, insert_visual_tokens, llama_hf_config,
    roi_align, sam_vision_encoder, slot_attention_mask, uses_region_tokens)



class UniRESTorch(nn.Module):
  """The assembled model; `model_config` is the run's `model` config section as a dict."""

  def __init__(self, model_config: Mapping[str, Any], llm: nn.Module | None = None,
               vision_tower: nn.Module | None = None):
    super().__init__()
    from transformers import CLIPVisionModel, ConvNextModel, LlamaForCausalLM
    cfg = self.config = dict(model_config)
    self.dense_source = cfg.get("dense_source", "convnext")
    if self.dense_source not in ("convnext", "sam_vit"):
      raise ValueError(f"model.dense_source {self.dense_source!r}: expected 'convnext' or 'sam_vit'")
    self.use_dynamic_query = bool(cfg.get("dynamic_query", True))
    flow = cfg["vision_flow"]
    self.uses_convnext = uses_region_tokens(flow) or self.dense_source == "convnext"
    decoder_dim = cfg["mask_decoder"]["transformer_dim"]
    llm_width = cfg["llm"]["hidden_size"]
    self.llm = llm if llm is not None else LlamaForCausalLM(llama_hf_config(cfg["llm"]))
    self.vision_tower = vision_tower if vision_tower is not None else CLIPVisionModel(clip_hf_config(cfg["vit"]))
    dims = cfg["convnext"]["dims"]
    if self.uses_convnext:
      self.vision_high = ConvNextModel(convnext_hf_config(cfg["convnext"]))
    self.vision_flow = VisionFlow(flow, cfg["vit"]["width"], dims[flow["roi_feature_stage"]], llm_width)
    self.seg_head = SegHead(llm_width, decoder_dim)
    if self.use_dynamic_query:
      self.visual_key_proj = nn.Linear(llm_width, decoder_dim)
      self.dynamic_query = DynamicQuery(decoder_dim, cfg["mask_decoder"]["num_heads"])
    if self.dense_source == "sam_vit":
      self.sam_vit = sam_vision_encoder(cfg["sam_vit"])
      if cfg["sam_vit"]["out_channels"] != decoder_dim:
        self.sam_dense_proj = nn.Linear(cfg["sam_vit"]["out_channels"], decoder_dim)
    else:
      self.dense_neck = DenseNeck(dims[cfg["dense_feature_stage"]], decoder_dim)
    self.sam = SamDecoder(cfg["mask_decoder"])

  # --- loading ---------------------------------------------------------------------------------------------------
  @classmethod
  def from_exported(cls, directory: str, dtype: torch.dtype | None = None) -> "UniRESTorch":
    """Loads `OUT/` of `scripts/convert_to_pytorch.py`: `llm/`, `vision_tower/`, the heads (`unires.safetensors`
    or its shards and index), `config.json`, and `lora.safetensors` when the export kept the factors. Every tensor
    of the heads must be a parameter here and vice versa. `dtype`: the compute dtype (default: the export's)."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"export {directory!r} has no {CONFIG_FILE} (expected a convert_to_pytorch.py output)")
    with open(path) as f:
      exported = json.load(f)
    llm = LlamaForCausalLM.from_pretrained(os.path.join(directory, "llm"), attn_implementation="eager")
    tower = CLIPVisionModel.from_pretrained(os.path.join(directory, "vision_tower"), attn_implementation="eager")
    model = cls(exported["model"], llm=llm, vision_tower=tower)
    heads = shards.load_sharded(directory, HEADS_PREFIX)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    if unexpected:
      raise KeyError(f"{HEADS_PREFIX} tensors: {unexpected[0]!r} is not a parameter of UniRESTorch")
    missing = [n for n in missing if not n.startswith(("llm.", "vision_tower."))]
    if missing:
      raise KeyError(f"{HEADS_PREFIX} tensors: parameter {missing[0]!r} is missing ({len(missing)} missing)")
    if os.path.exists(os.path.join(directory, LORA_FILE)):
      model.apply_lora(os.path.join(directory, LORA_FILE))
    if dtype is None:
      dtype = getattr(torch, exported.get("export", {}).get("dtype", "float32"))
    tokenizer_path = os.path.join(directory, "tokenizer.model")
    if "prompt" in exported and os.path.exists(tokenizer_path):
      from unires_jax.data.tokenizer import Tokenizer
      model.prompt, model.tokenizer = exported["prompt"], Tokenizer(tokenizer_path)
    return model.to(dtype).eval()

  def apply_lora(self, path: str) -> None:
    """Wraps each Linear named in a `lora.safetensors` (`<module>.lora_A` [r, in], `<module>.lora_B` [out, r],
    metadata `scale`) in a `LoraLinear`, so the factors stay separate from the base weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
      metadata = f.metadata() or {}
    if "scale" not in metadata:
      raise KeyError(f"{path!r}: metadata has no 'scale' (alpha / rank)")
    factors = load_file(path)
    modules = sorted({name.rsplit(".", 1)[0] for name in factors})
    for module_name in modules:
      parent_name, _, child = module_name.rpartition(".")
      parent = self.get_submodule(parent_name)
      base = getattr(parent, child, None)
      if not isinstance(base, nn.Linear):
        raise KeyError(f"{path!r}: {module_name!r} is not a Linear of UniRESTorch")
      for part in ("lora_A", "lora_B"):
        if f"{module_name}.{part}" not in factors:
          raise KeyError(f"{path!r}: {module_name}.{part} is missing")
      setattr(parent, child, LoraLinear(base, factors[f"{module_name}.lora_A"], factors[f"{module_name}.lora_B"],
                                        float(metadata["scale"])))

  # --- pieces, also used by generation ---------------------------------------------------------------------------
  def _dtype(self):
    return self.seg_head.fc1.weight.dtype

  def encode_vision(self, batch) -> dict[str, Any]:
    cfg = self.config
    dtype = self._dtype()
    select = cfg["vit"].get("select_layer", -2) % (cfg["vit"]["depth"] + 1)
    vit_out = self.vision_tower(pixel_values=batch["image_low"].permute(0, 3, 1, 2).to(dtype),
                                output_hidden_states=True)
    image_features = vit_out.hidden_states[select][:, 1:]  # [B, Ni, Dv], class token dropped
    image_high = batch["image_high"].to(dtype)
    stages = None
    if self.uses_convnext:
      convnext_out = self.vision_high(pixel_values=image_high.permute(0, 3, 1, 2), output_hidden_states=True)
      stages = [h.permute(0, 2, 3, 1) for h in convnext_out.hidden_states[1:]]  # 4 × [B, h, w, C]
    canvas = cfg["convnext"]["image_size"]
    stage = stages[cfg["vision_flow"]["roi_feature_stage"]] if stages is not None else None
    groups = self.vision_flow(image_features, stage, batch["object_boxes"].to(dtype), batch["object_box_mask"],
                              batch["part_boxes"].to(dtype), batch["part_box_mask"], canvas)
    if self.dense_source == "sam_vit":
      sam_input = clip_to_sam_normalisation(batch["image_high"].float()).to(dtype).permute(0, 3, 1, 2)
      dense = self.sam_vit(pixel_values=sam_input).last_hidden_state.permute(0, 2, 3, 1)  # [B, h, w, C]
      if hasattr(self, "sam_dense_proj"):
        dense = self.sam_dense_proj(dense)  # [B, h, w, Cd]
    else:
      dense = self.dense_neck(stages[cfg["dense_feature_stage"]])  # [B, h, w, Cd]
    return {"groups": groups, "dense": dense}

  def embed_sequence(self, input_ids, token_type, attention_mask, vision, object_box_mask, part_box_mask):
    """Token embeddings with the visual groups in their slots [B, L, D], and the attention mask [B, L] bool."""
    groups = vision["groups"]
    embeds = self.llm.get_input_embeddings()(input_ids.long())  # [B, L, D]
    embeds = insert_visual_tokens(embeds, token_type, {TOKEN_IMAGE: groups["image"], TOKEN_OBJECT: groups["object"],
                                                       TOKEN_PART: groups["part"]})
    mask = slot_attention_mask(attention_mask, token_type, {TOKEN_OBJECT: object_box_mask, TOKEN_PART: part_box_mask})
    return embeds, mask

  def decode_masks(self, seg_hidden, sequence_hidden, token_type, attention_mask, dense):
    """seg_hidden [B, D] → mask logits on the S_h canvas [B, S_h, S_h] (float32) and IoU prediction [B]."""
    seg_prompt = self.seg_head(seg_hidden)[:, None]  # [B, 1, Cd]
    sparse = seg_prompt
    if self.use_dynamic_query:
      is_visual = (token_type > TOKEN_TEXT) & attention_mask.bool()
      dynamic_prompt = self.dynamic_query(seg_prompt, self.visual_key_proj(sequence_hidden), is_visual)  # [B, 1, Cd]
      sparse = torch.cat([seg_prompt, dynamic_prompt], dim=1)  # [B, 2, Cd]
    masks, iou = self.sam(dense, sparse)  # [B, 4h, 4w], [B]
    size = self.config["convnext"]["image_size"]
    mask_logits = F.interpolate(masks[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return mask_logits[:, 0], iou.float()

  # --- the teacher-forced forward --------------------------------------------------------------------------------
  def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher-forced forward on a DESIGN.md batch (torch tensors) → logits, mask_logits, iou_pred."""
    vision = self.encode_vision(batch)
    token_type = batch["token_type"]
    embeds, mask = self.embed_sequence(batch["input_ids"], token_type, batch["attention_mask"], vision,
                                       batch["object_box_mask"], batch["part_box_mask"])
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # real tokens before each slot, as the JAX LLM
    hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
                            use_cache=False).last_hidden_state  # [B, L, D]
    logits = self.llm.lm_head(hidden).float()  # [B, L, V]
    seg_index = batch["seg_index"].long()
    seg_hidden = torch.gather(hidden, 1, seg_index[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]  # [B, D]
    mask_logits, iou = self.decode_masks(seg_hidden, hidden, token_type, mask, vision["dense"])
    return {"logits": logits, "mask_logits": mask_logits, "iou_pred": iou}

  # --- generation ------------------------------------------------------------------------------------------------
  def generate(self, batch: Mapping[str, torch.Tensor], seg_id: int, eos_id: int, pad_id: int,
               max_new_tokens: int = 16) -> dict[str, torch.Tensor]:
    """Greedy decoding with the KV cache from a prompt batch (`convert/torch_generate.py`)."""
    from unires_jax.convert import torch_generate
    return torch_generate.generate(self, batch, seg_id, eos_id, pad_id, max_new_tokens)

  def predictor(self):
    """A `torch_generate.Predictor` over this model, with the export's prompt settings and tokenizer."""
    from unires_jax.convert import torch_generate
    if getattr(self, "tokenizer", None) is None or not getattr(self, "prompt", None):
      raise ValueError("predicting needs the prompt settings and tokenizer of an export: load with "
                       "from_exported(OUT) of an export that has tokenizer.model and a 'prompt' section in config.json "
                       "(export the checkpoint again if it has none)")
    return torch_generate.Predictor(self, self.prompt, self.tokenizer)

  def predict(self, image, text: str, boxes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A mask for one uint8 [h, w, 3] image and phrase (`torch_generate.Predictor.predict`)."""
    return self.predictor().predict(image, text, boxes)
