"""LISA (dvlab-research/LISA) as a UniRES variant: the model a LISA checkpoint fills.

    python scripts/import_pretrained.py --config configs/lisa.py:7b --out /ckpt/lisa7b \
        --lisa /hf/LISA-7B-v1 --vision-tower /hf/clip-vit-large-patch14

`arg`: `7b` (LISA-7B-v1, the default), `13b` (LISA-13B-llama2-v1), `1b` (a 1B-class LISA layout for the import
benchmark, `scripts/benchmark_lisa.py`: LLaMA-1-style 2048 × 20 layers, CLIP ViT-B/14 and SAM ViT-B) or `tiny` (tests). What differs from UniRES++
(`configs/common.py`): CLIP ViT-L/14 at 224 px with features from the second-to-last layer and a single-Linear
projector; no object or part slots and no granularity embedding; the SAM ViT-H dense source (SAM's own
normalisation, `UniRES.encode_vision`); the `[SEG]` prompt as the only sparse prompt (`dynamic_query` off);
segment-anything's mask decoder LayerNorm eps (1e-5, where HF's SamModel uses 1e-6); LISA's llava_v1 prompt
(`data.prompt_style`). `model.convnext.image_size` is the 1024 px high-res canvas (the ConvNeXt itself is not
built). Switching the UniRES++ parts back on (`vision_flow.max_object_boxes/max_part_boxes`, `projector`,
`granularity_embedding`, `dynamic_query`) and pointing `train.init_from` at an import of a LISA checkpoint starts a
UniRES++ run from LISA's weights (the new parts fresh-initialised).
"""

from __future__ import annotations

import ml_collections

from configs import common, data_common

SIZES = ("tiny", "1b", "7b", "13b")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
# LISA's referring-segmentation question and answers (its utils/utils.py); eval uses the first question.
QUESTIONS = ("What is {phrase} in this image? Please output segmentation mask.",
             "Can you segment {phrase} in this image?",
             "Please segment {phrase} in this image.")
ANSWERS = ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].",
           "[SEG].")


def lisa_model_config(size: str = "7b") -> ml_collections.ConfigDict:
  """The `model` section of LISA at `size` (one of SIZES)."""
  if size == "tiny":
    vit = common._vit(image_size=56, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64)
    llm = common._llm(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128,
                      max_seq_len=352)  # room for the llava_v1 system text under a near-character-level tokenizer
    sam_vit = dict(image_size=64, patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=64, window_size=2,
                   global_attn_indexes=[1], out_channels=32)
    mask_decoder = common._mask_decoder(dim=32, depth=2, num_heads=4, mlp_dim=64)
  elif size == "1b":  # configs/common.py's 1b LLM width and depth, multi-head as LLaMA-1, + LISA's 4 added tokens
    vit = common._vit(image_size=224, patch_size=14, width=768, depth=12, num_heads=12, mlp_dim=3072)
    llm = common._llm(vocab_size=32004, hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=16,
                      mlp_dim=5632, max_seq_len=1024)
    sam_vit = dict(image_size=1024, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, window_size=14,
                   global_attn_indexes=[2, 5, 8, 11], out_channels=256)  # segment-anything's ViT-B
    mask_decoder = common._mask_decoder(dim=256, depth=2, num_heads=8, mlp_dim=2048)
  elif size in ("7b", "13b"):
    vit = common._vit(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096)
    if size == "7b":  # LLaMA-1 7B (Vicuna v1.1) + <im_patch> <im_start> <im_end> [SEG]
      llm = common._llm(vocab_size=32004, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        mlp_dim=11008, max_seq_len=2048)
    else:  # LLaMA-2 13B + [SEG]
      llm = common._llm(vocab_size=32001, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                        mlp_dim=13824, max_seq_len=4096)
    sam_vit = dict(image_size=1024, patch_size=16, width=1280, depth=32, num_heads=16, mlp_dim=5120, window_size=14,
                   global_attn_indexes=[7, 15, 23, 31], out_channels=256)
    mask_decoder = common._mask_decoder(dim=256, depth=2, num_heads=8, mlp_dim=2048)
  else:
    raise ValueError(f"unknown LISA size {size!r}; expected one of {SIZES}")
  mask_decoder["layer_norm_eps"] = 1e-5  # segment-anything's TwoWayAttentionBlock uses torch's default
  base = common.model_config("tiny")
  return ml_collections.ConfigDict(dict(
      size=size,
      dtype="float32",
      param_dtype="float32",
      vit=vit,
      # Not built (no region tokens, SAM dense source); its image_size is the high-res canvas of SAM's encoder.
      convnext=dict(base.convnext.to_dict(), image_size=sam_vit["image_size"]),
      vision_flow=dict(max_object_boxes=0, max_part_boxes=0, roi_output_size=7, sampling_ratio=2,
                       roi_feature_stage=2, projector="linear", granularity_embedding=False),
      llm=llm,
      mask_decoder=mask_decoder,
      dense_source="sam_vit",
      dense_feature_stage=2,
      sam_vit=sam_vit,
      dynamic_query=False,
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "7b"
  c = ml_collections.ConfigDict()
  c.model = lisa_model_config(size)
  if size != "tiny":
    c.model.dtype = "bfloat16"
  c.mesh = common.mesh_config(data=1 if size != "tiny" else -1, fsdp=-1 if size != "tiny" else 1, tensor=1)
  c.sharding_rules = common.sharding_rules()
  c.seed = 0
  c.data = data_common.data_config("toy" if size == "tiny" else "full")
  c.data.prompt_style = "llava_v1"
  c.data.system_prompt = LLAVA_V1_SYSTEM
  c.data.instruction_templates = list(QUESTIONS)
  c.data.answer_templates = list(ANSWERS)
  c.data.max_text_len = 320 if size == "tiny" else 512
  c.train = common.train_config(
      total_steps=10000, log_every=20, checkpoint_every=1000,
      frozen=("vision_low/.*", "sam_vit/.*", "llm/layers/.*", "llm/norm/.*"),
      lora=dict(enabled=size != "tiny", rank=8, alpha=16.0, stacked_prefixes=["llm/layers/"],
                targets=common.LORA_TARGETS))
  c.optim = common.optim_config(learning_rate=3e-4, warmup_steps=100, b2=0.95, weight_decay=0.0)
  c.generation = dict(max_new_tokens=32)
  c.evals = {}  # name → configs/eval/base.py eval_config(...)
  return c
