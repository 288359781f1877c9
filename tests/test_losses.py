"""Losses against hand-computed values, optax, and the all-masked / no-target edge cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unires_jax.models import losses


def test_cross_entropy_hand_computed():
  # Two positions with uniform logits over 4 tokens (NLL = log 4) and one with a confident right answer.
  logits = jnp.asarray([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 10.0, 0.0]]])
  targets = jnp.asarray([[1, 3, 2]])
  mask = jnp.asarray([[1.0, 0.0, 1.0]])
  want = (math.log(4.0) + (math.log(3.0 + math.exp(10.0)) - 10.0)) / 2.0
  np.testing.assert_allclose(float(losses.lm_cross_entropy(logits, targets, mask)), want, rtol=1e-6)


def test_cross_entropy_matches_optax_and_is_float32_for_bf16_logits():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  mask = (rng.random((2, 5)) > 0.4).astype(np.float32)
  per_token = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(targets))
  want = float((per_token * mask).sum() / mask.sum())
  got = losses.lm_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  bf16 = losses.lm_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(mask))
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(float(bf16), want, rtol=2e-2)


def test_cross_entropy_all_masked_is_zero_with_finite_grads():
  logits = jnp.ones((2, 3, 5))
  grads = jax.grad(lambda x: losses.lm_cross_entropy(x, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))))(logits)
  assert float(losses.lm_cross_entropy(logits, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))) == 0.0
  assert np.all(np.isfinite(np.asarray(grads))) and float(jnp.abs(grads).max()) == 0.0


def test_bce_hand_computed_and_matches_optax():
  # Mask 0: logits 0 everywhere → BCE log 2 per pixel. Mask 1 has weight 0 and must not count.
  logits = jnp.asarray([[[0.0, 0.0], [0.0, 0.0]], [[5.0, -5.0], [1.0, 2.0]]])
  gt = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
  got = losses.mask_bce(logits, gt, jnp.asarray([1.0, 0.0]))
  np.testing.assert_allclose(float(got), math.log(2.0) / (1.0 + 1e-8), rtol=1e-6)

  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 6, 5)).astype(np.float32) * 4
  gt = (rng.random((3, 6, 5)) > 0.5).astype(np.float32)
  weight = np.array([1.0, 0.0, 1.0], np.float32)
  per_mask = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(gt)).mean(axis=(1, 2))
  want = float((per_mask * weight).sum() / (weight.sum() + 1e-8))
  np.testing.assert_allclose(float(losses.mask_bce(jnp.asarray(logits), jnp.asarray(gt), jnp.asarray(weight))),
                             want, rtol=1e-6)


def test_dice_follows_lisa_formula():
  # Huge logits → p ∈ {0, 1}. Mask 0 predicts exactly its 2-pixel target: loss = 1 - (4 + 1e-3)/(4 + 1e-3) = 0.
  # Mask 1 predicts 1 pixel of a disjoint 1-pixel target: 1 - (0 + 1e-3)/(2 + 1e-3).
  big = 50.0
  logits = jnp.asarray([[[big, big], [-big, -big]], [[big, -big], [-big, -big]]])
  gt = jnp.asarray([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
  want = (0.0 + (1.0 - 1e-3 / (2.0 + 1e-3))) / (2.0 + 1e-8)
  got = losses.mask_dice(logits, gt, jnp.asarray([1.0, 1.0]))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)

  # Against LISA's code transcribed in numpy (divide by scale, add eps).
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 4, 4)).astype(np.float32)
  gt = (rng.random((2, 4, 4)) > 0.5).astype(np.float32)
  probs = 1.0 / (1.0 + np.exp(-logits.reshape(2, -1).astype(np.float64)))
  targets = gt.reshape(2, -1)
  numerator = 2 * (probs / 1000 * targets).sum(-1)
  denominator = (probs / 1000).sum(-1) + (targets / 1000).sum(-1)
  per_mask = 1 - (numerator + 1e-6) / (denominator + 1e-6)
  np.testing.assert_allclose(float(losses.mask_dice(jnp.asarray(logits), jnp.asarray(gt), jnp.ones(2))),
                             per_mask.sum() / (2 + 1e-8), rtol=1e-5)


def _batch_and_outputs(has_target):
  rng = np.random.default_rng(3)
  outputs = {"logits": jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32),
             "mask_logits": jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)}
  batch = {"target_ids": jnp.asarray(rng.integers(0, 7, size=(2, 4)), jnp.int32),
           "loss_mask": jnp.asarray([[0, 1, 1, 0], [0, 0, 1, 1]], jnp.float32),
           "gt_mask": jnp.asarray(rng.random((2, 8, 8)) > 0.5, jnp.float32),
           "has_target": jnp.asarray(has_target)}
  return outputs, batch


def test_total_loss_weights_parts_and_skips_no_target_masks():
  outputs, batch = _batch_and_outputs([True, False])
  loss, parts = losses.total_loss(outputs, batch)
  np.testing.assert_allclose(float(loss), float(parts["ce"] + 2.0 * parts["bce"] + 0.5 * parts["dice"]), rtol=1e-6)
  # Only sample 0 counts for the mask terms.
  only_first = losses.mask_bce(outputs["mask_logits"][:1], batch["gt_mask"][:1], jnp.ones(1))
  np.testing.assert_allclose(float(parts["bce"]), float(only_first), rtol=1e-6)
  loss_ce_only, _ = losses.total_loss(outputs, batch, weights=dict(bce=0.0, dice=0.0))
  np.testing.assert_allclose(float(loss_ce_only), float(parts["ce"]), rtol=1e-6)


def test_total_loss_without_targets_has_no_mask_loss_or_mask_gradient():
  outputs, batch = _batch_and_outputs([False, False])
  loss, parts = losses.total_loss(outputs, batch)
  assert float(parts["bce"]) == 0.0 and float(parts["dice"]) == 0.0
  np.testing.assert_allclose(float(loss), float(parts["ce"]), rtol=1e-6)
  grad = jax.grad(lambda m: losses.total_loss({**outputs, "mask_logits": m}, batch)[0])(outputs["mask_logits"])
  assert float(jnp.abs(grad).max()) == 0.0


def test_total_loss_errors_name_the_problem():
  outputs, batch = _batch_and_outputs([True, True])
  with pytest.raises(ValueError, match="mse"):
    losses.total_loss(outputs, batch, weights=dict(mse=1.0))
  with pytest.raises(KeyError, match="has_target"):
    losses.total_loss(outputs, {k: v for k, v in batch.items() if k != "has_target"})
