"""Optimizer pieces: schedule values, per-group learning rates, frozen groups, accumulation, LoRA."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unires_jax.train import lora, optimizer, partition


def _cfg(**overrides):
  base = dict(learning_rate=1e-2, warmup_steps=4, total_steps=12, final_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8,
              weight_decay=0.0, grad_clip=0.0, grad_accum_steps=1, lr_multipliers=[])
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def test_schedule_warms_up_linearly_then_follows_the_cosine():
  schedule = optimizer.learning_rate_schedule(_cfg())
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(2)), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(4)), 1e-2, rtol=1e-6)
  # Halfway through the decay (8 steps after warm-up): end + (peak - end) * (1 + cos(pi/2)) / 2.
  np.testing.assert_allclose(float(schedule(8)), 1e-3 + (1e-2 - 1e-3) * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(12)), 1e-3, rtol=1e-5)


def test_lr_multipliers_scale_their_group():
  params = {"llm": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  opt, _ = optimizer.make_optimizer(_cfg(warmup_steps=0, lr_multipliers=[["llm/.*", 0.1]]), params)
  state = opt.init(params)
  for _ in range(2):
    updates, state = opt.update(grads, state, params)
  # Adam's first steps move by ≈ lr; the llm group by a tenth of it.
  ratio = float(updates["llm"]["w"][0] / updates["head"]["w"][0])
  np.testing.assert_allclose(ratio, 0.1, rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  y = rng.normal(size=(8,)).astype(np.float32)
  params = {"w": jnp.zeros(3)}
  loss = lambda p, xb, yb: jnp.mean((xb @ p["w"] - yb) ** 2)

  big, _ = optimizer.make_optimizer(_cfg(warmup_steps=0), params)
  state = big.init(params)
  updates, _ = big.update(jax.grad(loss)(params, x, y), state, params)
  expected = optax.apply_updates(params, updates)

  accum, _ = optimizer.make_optimizer(_cfg(warmup_steps=0, grad_accum_steps=2), params)
  state = accum.init(params)
  current = params
  for half in (slice(0, 4), slice(4, 8)):
    updates, state = accum.update(jax.grad(loss)(current, x[half], y[half]), state, current)
    current = optax.apply_updates(current, updates)
  np.testing.assert_allclose(np.asarray(current["w"]), np.asarray(expected["w"]), rtol=1e-5, atol=1e-7)


def test_frozen_patterns_and_unknown_patterns():
  params = {"vision_low": {"w": jnp.ones(2)}, "llm": {"w": jnp.ones(2)}}
  mask = partition.trainable_mask(params, frozen=["vision_low/.*"])
  assert mask == {"vision_low": {"w": False}, "llm": {"w": True}}
  with pytest.raises(ValueError, match="visual_low"):
    partition.trainable_mask(params, frozen=["visual_low/.*"])


def test_lora_starts_as_identity_and_merges_a_low_rank_delta():
  rng = np.random.default_rng(0)
  params = {"llm": {"layers": {"q": {"kernel": jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32)},
                               "mlp": {"kernel": jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)}}}}
  factors = lora.init_lora(params, jax.random.key(0), [("llm/layers/q/kernel", 1), ("llm/layers/mlp/kernel", 1)],
                           rank=2, stacked_prefixes=("llm/layers/",))
  assert factors["llm.layers.q.kernel"]["a"].shape == (2, 6, 2)
  assert factors["llm.layers.q.kernel"]["b"].shape == (2, 2, 12)
  merged = lora.merge_lora({**params, "lora": factors}, alpha=4.0, rank=2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), merged, params)

  b = jnp.asarray(rng.normal(size=(2, 2, 12)), jnp.float32)
  factors["llm.layers.q.kernel"]["b"] = b
  merged = lora.merge_lora({**params, "lora": factors}, alpha=4.0, rank=2)
  a = np.asarray(factors["llm.layers.q.kernel"]["a"])
  for layer in range(2):
    delta = (a[layer] @ np.asarray(b[layer])).reshape(6, 3, 4) * 2.0
    np.testing.assert_allclose(np.asarray(merged["llm"]["layers"]["q"]["kernel"][layer]),
                               np.asarray(params["llm"]["layers"]["q"]["kernel"][layer]) + delta, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="match no parameter"):
    lora.init_lora(params, jax.random.key(0), [("llm/nothing", 1)], rank=2)
