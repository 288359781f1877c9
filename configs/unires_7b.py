"""The paper-sized UniRES++: CLIP ViT-L/14-336, CLIP ConvNeXt-L, a 7B LLaMA decoder, a SAM-sized mask decoder.

`arg` picks the model size (`7b` by default; `1b`, `small` for smaller variants of the same recipe).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "7b"
  c = ml_collections.ConfigDict()
  c.model = common.model_config(size)
  c.model.dtype = "bfloat16"
  c.mesh = common.mesh_config(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = common.sharding_rules()
  c.seed = 0
  c.batch_size = 32
  return c
