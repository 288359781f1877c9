"""optax: AdamW with linear warmup + cosine decay, global-norm clipping, per-group learning rates,
optional gradient accumulation. Applied to the trainable part of the parameters only (see partition.py).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from unires_jax.train.partition import param_path


def learning_rate_schedule(cfg: Any) -> optax.Schedule:
  """Linear warmup from 0 to `cfg.learning_rate`, then cosine decay to `learning_rate * final_lr_ratio`."""
  total = int(cfg.total_steps)
  warmup = min(int(cfg.warmup_steps), max(total - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(cfg.learning_rate), warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=float(cfg.learning_rate) * float(cfg.final_lr_ratio))


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (no norms, biases, or 1-D embeddings)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim >= 2 and "norm" not in param_path(p) and "embedding" not in param_path(p).split("/")[-1],
      params)


def _adamw(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                     weight_decay=float(cfg.weight_decay), mask=_decay_mask)


def make_optimizer(cfg: Any, trainable_params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for `trainable_params` (a tree that may hold `None` for frozen leaves).

  `cfg.lr_multipliers`: list of `(regex, multiplier)`; the first match sets a parameter's group (default 1.0).
  """
  schedule = learning_rate_schedule(cfg)
  groups = [(re.compile(pattern), float(mult)) for pattern, mult in cfg.get("lr_multipliers", [])]
  if groups:
    def label(path, _):
      path_str = param_path(path)
      for index, (pattern, _) in enumerate(groups):
        if pattern.match(path_str):
          return f"group{index}"
      return "default"
    labels = jax.tree_util.tree_map_with_path(label, trainable_params)
    transforms = {"default": _adamw(cfg, schedule)}
    for index, (_, mult) in enumerate(groups):
      transforms[f"group{index}"] = _adamw(cfg, lambda step, m=mult: schedule(step) * m)
    inner = optax.multi_transform(transforms, labels)
  else:
    inner = _adamw(cfg, schedule)
  optimizer = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), inner) if cfg.grad_clip else inner
  if int(cfg.get("grad_accum_steps", 1)) > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=int(cfg.grad_accum_steps))
  return optimizer, schedule
