"""The held-out loss: the training objective's parts, teacher forced, averaged over the batches of a prepared split."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import ml_collections

from unires_jax import xla_defaults
from unires_jax.data import pipeline
from unires_jax.models import objective

# heldout_loss(params, split_dir, batch_size=None) → {loss part: mean over the split's batches}
HeldoutLoss = Callable[..., dict[str, float]]


def make_heldout_loss(config: ml_collections.ConfigDict, model, params_transform: Callable, mesh,
                      rules) -> HeldoutLoss:
  """The held-out loss function of a run, jitted once: the run's loss weights, batches from its eval pipeline."""
  eval_step = objective.make_eval_step(model, dict(config.train.loss_weights), params_transform)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(eval_step, compiler_options=xla_defaults.for_model_config(config.model))

  def heldout_loss(params, split_dir: str, batch_size: int | None = None) -> dict[str, float]:
    totals, batches = {}, 0
    for local_batch in pipeline.make_eval_iterator(config, split_dir, batch_size=batch_size):
      batch = pipeline.to_global_batch(local_batch, mesh)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        parts = jax.device_get(jitted(params, batch))
      for key, value in parts.items():
        totals[key] = totals.get(key, 0.0) + float(value)
      batches += 1
    return {key: value / max(batches, 1) for key, value in totals.items()}

  return heldout_loss
