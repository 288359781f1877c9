"""The train state and its sharded creation: eval_shape → logical specs → shardings → jit(init, out_shardings).

Nothing full-size is ever materialised on one device: the 7B config's state is built shard by shard, and its
shapes and shardings can be inspected with no memory at all (`abstract_train_state`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unires_jax import sharding
from unires_jax.models.example_batch import abstract_batch  # noqa: F401  (re-exported)
from unires_jax.models.unires import UniRES, build_model  # noqa: F401  (re-exported)
from unires_jax.train import partition


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  """Every batch array split over `sharding.BATCH_AXES` on its leading dimension."""
  return {k: NamedSharding(mesh, P(sharding.BATCH_AXES, *([None] * (np.ndim(v) - 1)))) for k, v in batch.items()}


def make_init_fn(model: UniRES, optimizer: optax.GradientTransformation | None, mask_fn: Callable[[Any], Any],
                 extra_params_fn: Callable[[Any, jax.Array], dict] | None = None
                 ) -> Callable[[jax.Array, dict], TrainState]:
  """init(rng, batch) → TrainState with logically-boxed leaves (unboxed by the caller after sharding is decided).

  `extra_params_fn(params, rng) -> {name: subtree}` adds parameters outside the model (e.g. LoRA factors).
  """
  def init(rng, batch):
    model_rng, extra_rng = jax.random.split(rng)
    params = dict(model.init(model_rng, batch)["params"])
    if extra_params_fn is not None:
      params.update(extra_params_fn(nn.meta.unbox(params), extra_rng))
    opt_state = None
    if optimizer is not None:
      trainable, _ = partition.split(params, mask_fn(params))
      opt_state = optimizer.init(trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  return init


def _unboxed_mask_fn(trainable, frozen):
  def mask_fn(params):
    return partition.trainable_mask(nn.meta.unbox(params), trainable, frozen)
  return mask_fn


def abstract_train_state(model: UniRES, batch: dict, optimizer=None, trainable=(".*",), frozen=(),
                         extra_params_fn=None) -> TrainState:
  """ShapeDtypeStructs of the (boxed) state, no memory allocated."""
  init = make_init_fn(model, optimizer, _unboxed_mask_fn(trainable, frozen), extra_params_fn)
  return jax.eval_shape(init, jax.random.key(0), batch)


def create_sharded_state(model: UniRES, batch: dict, mesh: Mesh, rules, rng: jax.Array,
                         optimizer: optax.GradientTransformation | None = None, trainable=(".*",),
                         frozen=(), extra_params_fn=None) -> tuple[TrainState, Any]:
  """(state, state_shardings): parameters and optimizer state created directly in their shardings."""
  init = make_init_fn(model, optimizer, _unboxed_mask_fn(trainable, frozen), extra_params_fn)
  # Initialisation runs outside the mesh context: parameter shardings come from `out_shardings`, and Flax's
  # init-time constraints (which see pre-reshape kernels of DenseGeneral) stay inert.
  abstract = jax.eval_shape(init, rng, batch)
  state_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  unboxed_init = lambda r, b: nn.meta.unbox(init(r, b))
  state = jax.jit(unboxed_init, out_shardings=state_shardings)(rng, batch)
  return state, state_shardings
