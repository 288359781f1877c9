"""Inference: greedy generation with the KV cache; every generated `[SEG]` becomes a mask.

The eval batch holds the prompt followed by a reference answer; generation only sees the prompt (tokens up to
the position that predicts the first answer token) and writes its own answer. A row whose answer holds no
`[SEG]` is predicted no-target (empty mask). The mask prompt is the hidden state that *predicted* `[SEG]`, as in
training (docs/DESIGN.md). Batched: rows of different prompt lengths prefill together (right padding, masked)
and then step one token at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.models.llm import Llama, init_cache
from unires_jax.models.unires import DTYPES, UniRES


def prompt_end_index(loss_mask: jax.Array) -> jax.Array:
  """[B, L] → [B]: the last prompt position (the one predicting the first answer token)."""
  return jnp.argmax(loss_mask > 0, axis=1).astype(jnp.int32)


def _prefill(module: UniRES, batch, prompt_mask):
  vision = module.encode_vision(batch)
  embeds, mask = module.embed_sequence(batch["input_ids"], batch["token_type"], prompt_mask, vision,
                                       batch["object_box_mask"], batch["part_box_mask"])
  hidden = module.run_llm(embeds, mask, decode=True)  # [B, L, D]
  return hidden, mask, vision["dense"]


def _step(module: UniRES, token_ids, token_mask):
  embeds = module.llm.embed(token_ids)  # [B, 1, D]
  hidden = module.run_llm(embeds, token_mask, decode=True)  # [B, 1, D]
  return hidden, module.lm_logits(hidden)


def _masks(module: UniRES, seg_hidden, sequence_hidden, token_type, mask, dense):
  return module.decode_masks(seg_hidden, sequence_hidden, token_type, mask, dense)


def make_generate_fn(model: UniRES, seg_id: int, eos_id: int, pad_id: int, max_new_tokens: int = 16,
                     params_transform: Callable = lambda p: p) -> Callable:
  """generate(params, batch) → {'mask_logits' [B, S, S], 'has_seg' [B], 'tokens' [B, T], 'iou_pred' [B]}."""
  cfg = model.config
  llm = Llama(cfg.llm, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")

  def generate(params, batch):
    params = params_transform(params)
    batch_size, seq_len = batch["input_ids"].shape
    if seq_len + max_new_tokens > cfg.llm.max_seq_len:
      raise ValueError(f"prompt length {seq_len} + max_new_tokens {max_new_tokens} exceeds the KV cache "
                       f"(model.llm.max_seq_len={cfg.llm.max_seq_len})")
    end = prompt_end_index(batch["loss_mask"])  # [B]
    prompt_mask = batch["attention_mask"] & (jnp.arange(seq_len)[None, :] <= end[:, None])  # [B, L]
    cache = {"llm": init_cache(llm, batch_size)}
    (hidden, mask, dense), variables = model.apply({"params": params, "cache": cache}, batch, prompt_mask,
                                                   method=_prefill, mutable=["cache"])
    last_hidden = jnp.take_along_axis(hidden, end[:, None, None], axis=1)[:, 0]  # [B, D]
    first_logits = model.apply({"params": params}, last_hidden[:, None], method=lambda m, h: m.lm_logits(h))
    token = jnp.argmax(first_logits[:, 0], axis=-1).astype(jnp.int32)  # [B]

    def body(carry, _):
      cache, token, predicting_hidden, done, seg_hidden, has_seg = carry
      active = ~done  # [B]
      is_seg = (token == seg_id) & active & ~has_seg
      seg_hidden = jnp.where(is_seg[:, None], predicting_hidden, seg_hidden)
      has_seg = has_seg | is_seg
      emitted = jnp.where(active, token, pad_id)
      done = done | (active & (token == eos_id))
      (step_hidden, logits), new_vars = model.apply(
          {"params": params, "cache": cache}, emitted[:, None], active[:, None], method=_step, mutable=["cache"])
      next_token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
      return (new_vars["cache"], next_token, step_hidden[:, 0], done, seg_hidden, has_seg), emitted

    init = (variables["cache"], token, last_hidden, jnp.zeros((batch_size,), bool), jnp.zeros_like(last_hidden),
            jnp.zeros((batch_size,), bool))
    (_, _, _, _, seg_hidden, has_seg), tokens = jax.lax.scan(body, init, None, length=max_new_tokens)
    mask_logits, iou_pred = model.apply({"params": params}, seg_hidden, hidden, batch["token_type"], mask, dense,
                                        method=_masks)
    return {"mask_logits": mask_logits, "has_seg": has_seg, "tokens": tokens.T, "iou_pred": iou_pred}

  return generate


def teacher_forced_masks(model: UniRES, params_transform: Callable = lambda p: p) -> Callable:
  """predict(params, batch) with the reference answer fed in (no generation): an upper bound used in tests."""
  def predict(params, batch):
    out = model.apply({"params": params_transform(params)}, batch)
    return {"mask_logits": out["mask_logits"], "has_seg": batch["has_target"]}
  return predict


def decode_answers(tokens: np.ndarray, tokenizer: Any) -> list[str]:
  """Generated ids [B, T] → text, cut at the first end-of-sequence."""
  texts = []
  for row in np.asarray(tokens):
    ids = []
    for token in row.tolist():
      if token == tokenizer.eos_id:
        break
      ids.append(token)
    texts.append(tokenizer.decode(ids))
  return texts
