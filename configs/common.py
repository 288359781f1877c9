"""Shared config builders: model sizes, mesh and sharding rules. Experiment files in configs/ compose them.

Sizes: `tiny` (seconds on CPU; tests and the toy run), `small` (≈100M, CPU benchmarks), `1b` (GPU benchmark),
`7b` (the paper: CLIP ViT-L/14-336, CLIP ConvNeXt-L, a 7B LLaMA/Vicuna decoder, SAM-sized mask decoder).
"""

from __future__ import annotations

import ml_collections

from unires_jax import sharding
from unires_jax.models import losses

MODEL_SIZES = ("tiny", "small", "1b", "7b")


def _vit(image_size, patch_size, width, depth, num_heads, mlp_dim, select_layer=-2):
  return dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
              mlp_dim=mlp_dim, select_layer=select_layer, layer_norm_eps=1e-5)


def _convnext(image_size, depths, dims):
  return dict(image_size=image_size, depths=list(depths), dims=list(dims), layer_norm_eps=1e-6,
              layer_scale_init=1e-6)


def _llm(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, mlp_dim, max_seq_len, tie_embeddings=False):
  return dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
              num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, mlp_dim=mlp_dim,
              rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=tie_embeddings, max_seq_len=max_seq_len,
              scan_layers=True, remat_policy="nothing_saveable",
              attention_impl="xla",  # "xla" | "cudnn" (GPU) | "splash" (TPU kernel) | "einsum" (reference)
              decode_layers="unstacked")  # "unstacked" (per-layer weights while decoding) | "scan"


def _mask_decoder(dim, depth, num_heads, mlp_dim):
  return dict(transformer_dim=dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, attention_downsample_rate=2,
              num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=dim, layer_norm_eps=1e-6)


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """The model section for one of MODEL_SIZES."""
  if size == "tiny":
    vit = _vit(image_size=56, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64)
    convnext = _convnext(image_size=128, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    llm = _llm(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
               max_seq_len=128)
    mask_decoder = _mask_decoder(dim=32, depth=2, num_heads=4, mlp_dim=64)
    flow = dict(max_object_boxes=4, max_part_boxes=8, roi_output_size=4, sampling_ratio=2, roi_feature_stage=2)
    dense_feature_stage = 1  # stride 8: a 16×16 grid at 128 px, masks at 64×64
  elif size == "small":
    vit = _vit(image_size=224, patch_size=14, width=384, depth=6, num_heads=6, mlp_dim=1536)
    convnext = _convnext(image_size=512, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512))
    llm = _llm(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1536,
               max_seq_len=512)
    mask_decoder = _mask_decoder(dim=128, depth=2, num_heads=4, mlp_dim=512)
    flow = dict(max_object_boxes=16, max_part_boxes=32, roi_output_size=7, sampling_ratio=2, roi_feature_stage=2)
    dense_feature_stage = 2
  elif size == "1b":
    vit = _vit(image_size=336, patch_size=14, width=768, depth=12, num_heads=12, mlp_dim=3072)
    convnext = _convnext(image_size=768, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    llm = _llm(vocab_size=32000, hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=8, mlp_dim=5632,
               max_seq_len=1024)
    mask_decoder = _mask_decoder(dim=256, depth=2, num_heads=8, mlp_dim=2048)
    flow = dict(max_object_boxes=32, max_part_boxes=64, roi_output_size=7, sampling_ratio=2, roi_feature_stage=2)
    dense_feature_stage = 2
  elif size == "7b":
    vit = _vit(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096)
    convnext = _convnext(image_size=1024, depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536))
    llm = _llm(vocab_size=32064, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
               max_seq_len=2048)
    mask_decoder = _mask_decoder(dim=256, depth=2, num_heads=8, mlp_dim=2048)
    flow = dict(max_object_boxes=32, max_part_boxes=64, roi_output_size=7, sampling_ratio=2, roi_feature_stage=2)
    dense_feature_stage = 2
  else:
    raise ValueError(f"unknown model size {size!r}; expected one of {MODEL_SIZES}")

  return ml_collections.ConfigDict(dict(
      size=size,
      dtype="float32",        # compute dtype ("bfloat16" on accelerators)
      param_dtype="float32",  # master weights
      vit=vit,
      convnext=convnext,
      vision_flow=flow,
      llm=llm,
      mask_decoder=mask_decoder,
      # Where the mask decoder's dense image features come from: "convnext" (default) or "sam_vit".
      dense_source="convnext",
      dense_feature_stage=dense_feature_stage,
      sam_vit=dict(image_size=1024, patch_size=16, width=1280, depth=32, num_heads=16, mlp_dim=5120,
                   window_size=14, global_attn_indexes=[7, 15, 23, 31], out_channels=256),
  ))


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def sharding_rules() -> list:
  return [list(rule) for rule in sharding.DEFAULT_RULES]


LORA_TARGETS = [["llm/layers/self_attn/(q|k|v)_proj/kernel", 1], ["llm/layers/self_attn/o_proj/kernel", 2],
                ["llm/layers/mlp/(gate|up|down)_proj/kernel", 1]]


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The `train` section; keyword arguments override the defaults."""
  c = dict(
      total_steps=1000,
      log_every=50,
      eval_every=0,
      checkpoint_every=500,
      checkpoint_steps=(),  # steps saved besides every `checkpoint_every`-th and the last, e.g. (1000, 2500)
      keep_last=2,
      keep_every_steps=0,
      async_checkpoint=True,
      trainable=(".*",),  # regexes on parameter paths; tuples so the command line can override them
      frozen=(),
      freeze_inert=True,  # also freeze parameters that cannot affect the loss (UniRESConfig.inert_parameter_patterns)
      loss_weights=dict(losses.DEFAULT_WEIGHTS),  # LISA's ce 1, bce 2, dice 0.5 (models/losses.py)
      lora=dict(enabled=False, rank=8, alpha=16.0, stacked_prefixes=["llm/layers/"], targets=LORA_TARGETS),
      peak_flops_per_device=0.0,  # 0: measured with a matmul at start-up
      init_from="",  # a checkpoint (scripts/import_pretrained.py output or a run) to start from
  )
  unknown = sorted(set(overrides) - set(c))
  if unknown:
    raise KeyError(f"train config: unknown key(s) {unknown}")
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The `optim` section (AdamW, warmup + cosine); keyword arguments override the defaults."""
  c = dict(learning_rate=1e-3, warmup_steps=50, final_lr_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
           grad_clip=1.0, grad_accum_steps=1, lr_multipliers=())  # lr_multipliers: ((regex, factor), ...)
  unknown = sorted(set(overrides) - set(c))
  if unknown:
    raise KeyError(f"optim config: unknown key(s) {unknown}")
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def proposals_config(source: str = "annotations", **overrides) -> ml_collections.ConfigDict:
  """The `proposals` section: which registered source (unires_jax/proposals) gives object and part boxes.

  `annotations` (ground truth, training only), `none`, `detections` (COCO results files; `{split}` in a path is
  replaced by the split name), `sam` (SAM automatic mask generation in JAX), `colour_regions` (flat-colour regions
  from the pixels, for the synthetic set).
  """
  c = dict(
      source=source,
      detections=dict(object_file="", part_file="", score_threshold=0.0, top_k=0, match_by="image_id"),
      # Flat-colour regions from the pixels alone (unires_jax/proposals/colour_regions.py; the synthetic set).
      colour_regions=dict(colour_quantum=8, merge_gap=1, min_object_area=16, min_part_area=4, max_objects=0,
                          max_parts=0),
      # SAM automatic mask generation (unires_jax/proposals/sam.py; defaults are segment-anything's).
      sam=dict(
          checkpoint="",  # a SamModel.save_pretrained folder, or one written by proposals.sam_model.save_converted
          points_per_side=32,  # point grid per side at crop layer 0
          points_per_batch=64,  # single-point prompts per decoder call and device
          pred_iou_thresh=0.88,  # keep masks with predicted IoU > this (0: off)
          stability_score_thresh=0.95,  # keep masks with stability score >= this (0: off)
          stability_score_offset=1.0,  # logit offset of the stability score
          mask_threshold=0.0,  # logit threshold of the binary masks
          box_nms_thresh=0.7,  # box NMS IoU within a crop
          crop_n_layers=0,  # extra crop layers (layer i: 2^i x 2^i crops)
          crop_nms_thresh=0.7,  # box NMS IoU across crops (smaller crops preferred)
          crop_overlap_ratio=512 / 1500,  # crop overlap, a fraction of the short side at layer 1
          crop_n_points_downscale_factor=1,  # points per side divided by this per layer
          crop_edge_atol=20.0,  # px: drop masks whose box is this close to an inner crop edge
          min_mask_region_area=0,  # px: remove smaller holes and islands, then NMS again (0: off)
          mask_canvas_multiple=64,  # masks are computed on square canvases of a multiple of this (compile reuse)
          part_levels=(0, 1),  # multimask levels that can be parts (2, SAM's "whole", is always an object)
          part_containment=0.9,  # a part has this fraction of its pixels inside a larger kept mask ...
          part_area_ratio=1.5,  # ... which is at least this many times its area
          max_objects=0, max_parts=0,  # keep the best K per image (0: all)
          dtype="float32",  # compute dtype of the SAM model ("bfloat16" on accelerators)
      ),
  )
  unknown = sorted(set(overrides) - set(c))
  if unknown:
    raise KeyError(f"proposals config: unknown key(s) {unknown}")
  c.update(overrides)
  return ml_collections.ConfigDict(c)
