"""The tiny model: seconds on CPU. Used by the tests and as the model of the toy run.

    python scripts/forward.py --config configs/tiny.py
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.model = common.model_config("tiny")
  c.mesh = common.mesh_config(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.seed = 0
  c.batch_size = 8
  return c
