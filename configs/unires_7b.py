"""The paper-sized UniRES++: CLIP ViT-L/14-336, CLIP ConvNeXt-L, a 7B LLaMA decoder, a SAM-sized mask decoder.

`arg` picks the model size (`7b` by default; `1b`, `small` for smaller variants of the same recipe). Training
follows LISA's recipe: image encoders frozen, LoRA on the LLM's attention and MLP kernels, the embeddings, LM head,
projectors, `[SEG]` path and mask decoder trained. Point it at prepared splits and a LLaMA tokenizer:

    python scripts/train.py --config configs/unires_7b.py --workdir gs://.../run \
        --config.data.sources='({"dir": "/data/prepared/mres32m/train", "weight": 1.0},)' \
        --config.data.tokenizer_path=/models/vicuna-7b/tokenizer.model --config.train.init_from=/models/imported
"""

import ml_collections

from configs import common, data_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "7b"
  c = ml_collections.ConfigDict()
  c.model = common.model_config(size)
  c.model.dtype = "bfloat16"
  c.mesh = common.mesh_config(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = common.sharding_rules()
  c.seed = 0
  c.data = data_common.data_config("full")
  c.train = common.train_config(
      total_steps=10000, log_every=20, checkpoint_every=1000, keep_every_steps=5000,
      frozen=("vision_low/.*", "vision_high/.*", "llm/layers/.*", "llm/norm/.*"),
      lora=dict(enabled=True, rank=8, alpha=16.0, stacked_prefixes=["llm/layers/"], targets=common.LORA_TARGETS))
  c.optim = common.optim_config(learning_rate=3e-4, warmup_steps=100, b2=0.95, weight_decay=0.0, grad_accum_steps=1)
  c.generation = dict(max_new_tokens=16)
  c.evals = {}  # name → configs/eval/base.py eval_config(...)
  return c
