"""The training objective as pure functions of the model: the loss of a batch, and the held-out evaluation of it.

`train/step.py` differentiates `make_loss_fn`; `eval/` reports `make_eval_step` on held-out splits; both see the same
loss (`models/losses.py`) with the same weights.
"""

from __future__ import annotations

from typing import Callable

import jax

from unires_jax.models import losses
from unires_jax.models.unires import UniRES


def make_loss_fn(model: UniRES, loss_weights: dict, params_transform: Callable = lambda p: p) -> Callable:
  """`params_transform` maps the stored parameters to the model's (e.g. merging LoRA factors)."""
  def loss_fn(params, batch, rng):
    outputs = model.apply({"params": params_transform(params)}, batch, train=True, rngs={"dropout": rng})
    loss, parts = losses.total_loss(outputs, batch, weights=loss_weights)
    return loss, parts
  return loss_fn


def make_eval_step(model: UniRES, loss_weights: dict, params_transform: Callable = lambda p: p) -> Callable:
  loss_fn = make_loss_fn(model, loss_weights, params_transform)

  def eval_step(params, batch) -> dict:
    loss, parts = loss_fn(params, batch, jax.random.key(0))
    return {"loss": loss, **parts}

  return eval_step
