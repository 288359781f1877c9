"""Training losses: next-token cross-entropy on the answer, and LISA's mask BCE + Dice on targeted samples.

The mask losses follow LISA (`model/LISA.py`: `sigmoid_ce_loss`, `dice_loss`) so loss values and weights are
comparable with it. All reductions run in float32 and are safe when nothing is selected (they return 0).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

DEFAULT_WEIGHTS = {"ce": 1.0, "bce": 2.0, "dice": 0.5}
# LISA's Dice constants: probabilities and targets are divided by `scale` before summing, and `eps` is added to
# both numerator and denominator. Multiplying through by `scale`, the per-mask loss is
#   1 - (2·Σ p·g + scale·eps) / (Σ p + Σ g + scale·eps),   i.e. a smoothing term of 1e-3 pixels.
DICE_SCALE = 1000.0
DICE_EPS = 1e-6
# LISA's guard on the mask count: losses are divided by (number of weighted masks + 1e-8).
NUM_MASKS_EPS = 1e-8


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 (with zero gradients) where the denominator is 0."""
  nonzero = denominator > 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def lm_cross_entropy(logits: jax.Array, target_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean next-token NLL over tokens where `loss_mask` is set.

  logits [B, L, V] (any float dtype; the log-softmax runs in float32), target_ids [B, L] int, loss_mask [B, L]
  (0/1 or weights). Returns a float32 scalar; 0 when the mask is all zero.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, L, V]
  target_log_probs = jnp.take_along_axis(log_probs, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = loss_mask.astype(jnp.float32)  # [B, L]
  return _safe_divide(-(target_log_probs * weights).sum(), weights.sum())


def _per_mask_bce(mask_logits: jax.Array, gt: jax.Array) -> jax.Array:
  """Mean over pixels of the sigmoid binary cross-entropy: [B, H, W] → [B]."""
  logits = mask_logits.astype(jnp.float32)
  targets = gt.astype(jnp.float32)
  # Stable form of -(g·log σ(x) + (1-g)·log(1-σ(x))).
  pixel_loss = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return pixel_loss.mean(axis=(-2, -1))


def _per_mask_dice(mask_logits: jax.Array, gt: jax.Array) -> jax.Array:
  """LISA's Dice loss per mask, [B, H, W] → [B] (see DICE_SCALE for the formula)."""
  probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32)) / DICE_SCALE
  targets = gt.astype(jnp.float32) / DICE_SCALE
  numerator = 2.0 * (probs * gt.astype(jnp.float32)).sum(axis=(-2, -1))
  denominator = probs.sum(axis=(-2, -1)) + targets.sum(axis=(-2, -1))
  return 1.0 - (numerator + DICE_EPS) / (denominator + DICE_EPS)


def _weighted_mask_mean(per_mask: jax.Array, sample_weight: jax.Array) -> jax.Array:
  weights = sample_weight.astype(jnp.float32)  # [B]
  return (per_mask * weights).sum() / (weights.sum() + NUM_MASKS_EPS)


def mask_bce(mask_logits: jax.Array, gt: jax.Array, sample_weight: jax.Array) -> jax.Array:
  """LISA's mask BCE: per-mask mean over pixels, summed over masks with `sample_weight` [B], divided by
  (Σ sample_weight + 1e-8). mask_logits, gt: [B, H, W]. 0 when no mask is weighted."""
  return _weighted_mask_mean(_per_mask_bce(mask_logits, gt), sample_weight)


def mask_dice(mask_logits: jax.Array, gt: jax.Array, sample_weight: jax.Array) -> jax.Array:
  """LISA's Dice: per mask `1 - (2Σpg/s + eps) / (Σp/s + Σg/s + eps)` with p = sigmoid(logits), s = 1000,
  eps = 1e-6; summed with `sample_weight` [B] and divided by (Σ sample_weight + 1e-8)."""
  return _weighted_mask_mean(_per_mask_dice(mask_logits, gt), sample_weight)


def total_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
               weights: Mapping[str, float] | Any | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of CE (on `loss_mask`), mask BCE and Dice (on samples with `has_target`).

  outputs: `logits` [B, L, V], `mask_logits` [B, S, S]; batch: `target_ids`, `loss_mask`, `gt_mask`,
  `has_target` (DESIGN.md). `weights` overrides DEFAULT_WEIGHTS term by term (a missing term keeps its
  default). Returns (loss, parts) with parts `ce`, `bce`, `dice` (unweighted) and `loss`.
  """
  if hasattr(weights, "to_dict"):  # a ConfigDict section
    weights = weights.to_dict()
  weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
  unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
  if unknown:
    raise ValueError(f"loss weights: unknown term(s) {unknown}; expected keys among {sorted(DEFAULT_WEIGHTS)}")
  weights = {**DEFAULT_WEIGHTS, **weights}
  for name in ("logits", "mask_logits"):
    if name not in outputs:
      raise KeyError(f"total_loss: model outputs lack {name!r} (have {sorted(outputs)})")
  for name in ("target_ids", "loss_mask", "gt_mask", "has_target"):
    if name not in batch:
      raise KeyError(f"total_loss: batch lacks {name!r} (have {sorted(batch)})")
  if outputs["mask_logits"].shape != batch["gt_mask"].shape:
    raise ValueError(f"total_loss: mask_logits {outputs['mask_logits'].shape} and gt_mask "
                     f"{batch['gt_mask'].shape} must have the same shape")

  sample_weight = batch["has_target"].astype(jnp.float32)
  parts = {
      "ce": lm_cross_entropy(outputs["logits"], batch["target_ids"], batch["loss_mask"]),
      "bce": mask_bce(outputs["mask_logits"], batch["gt_mask"], sample_weight),
      "dice": mask_dice(outputs["mask_logits"], batch["gt_mask"], sample_weight),
  }
  loss = sum(weights[name] * parts[name] for name in DEFAULT_WEIGHTS)
  parts["loss"] = loss
  return loss, parts
