"""Pure step functions: `train_step(state, batch, rng) -> (state, metrics)` and `eval_step(params, batch)`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from unires_jax.models.objective import make_eval_step, make_loss_fn  # noqa: F401  (re-exported)
from unires_jax.models.unires import UniRES
from unires_jax.train import partition
from unires_jax.train.state import TrainState


def make_train_step(model: UniRES, optimizer: optax.GradientTransformation, mask: Any, loss_weights: dict,
                    schedule: optax.Schedule | None = None, params_transform: Callable = lambda p: p) -> Callable:
  """The pure update. Gradients are taken w.r.t. the trainable parameters only; frozen ones get none."""
  loss_fn = make_loss_fn(model, loss_weights, params_transform)

  def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    trainable, frozen = partition.split(state.params, mask)

    def trainable_loss(trainable_params):
      return loss_fn(partition.merge(trainable_params, frozen), batch, rng)

    (loss, parts), grads = jax.value_and_grad(trainable_loss, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=partition.merge(trainable, frozen), opt_state=opt_state)
    metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return new_state, metrics

  return train_step


def grads_for(model: UniRES, params: Any, mask: Any, batch: dict, loss_weights: dict) -> Any:
  """Gradients of the loss w.r.t. the trainable parameters (a tree with `None` at frozen leaves)."""
  loss_fn = make_loss_fn(model, loss_weights)
  trainable, frozen = partition.split(params, mask)
  return jax.grad(lambda t: loss_fn(partition.merge(t, frozen), batch, jax.random.key(0))[0])(trainable)
