"""The model's prediction functions for evaluation, built and jitted once: generation over a global batch, back
to this process's rows (the split of big_vision's `predict_fns`)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from unires_jax import sharding, xla_defaults
from unires_jax.data import pipeline, prompts
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.eval import inference

def make_predict_fn(model, config, mesh, rules, params_transform: Callable = lambda p: p) -> Callable:
  """predict_fn(params, local_batch) → this process's rows of {'mask_logits', 'has_seg', 'tokens'}."""
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(config))
  generate = inference.make_generate_fn(
      model, seg_id=tokenizer.special_id(tokenizer_lib.SEG_TOKEN), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      max_new_tokens=prompts.max_new_tokens(config), params_transform=params_transform)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(generate, compiler_options=xla_defaults.for_model_config(config.model))

  def predict(params, local_batch):
    batch = pipeline.to_global_batch(local_batch, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      outputs = jitted(params, batch)
    if jax.process_count() > 1:
      outputs = multihost_utils.global_array_to_host_local_array(outputs, mesh, P(sharding.BATCH_AXES))
    return {k: np.asarray(v) for k, v in outputs.items()}

  return predict
