"""A random batch with the exact layout of docs/DESIGN.md, for tests, benchmarks and shape inference.

It follows the pipeline's sequence layout (BOS, image/object/part slots with their markers, phrase, answer with
`[SEG]`), with arbitrary ids standing for the special tokens, so the model can be exercised without data.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from unires_jax.models.unires import TOKEN_IMAGE, TOKEN_OBJECT, TOKEN_PART, UniRESConfig


def prompt_length(cfg: UniRESConfig) -> int:
  """Tokens before the text: BOS + 3 groups of slots with a start and end marker each."""
  return 1 + cfg.num_image_tokens + cfg.vision_flow.max_object_boxes + cfg.vision_flow.max_part_boxes + 6


def example_batch(cfg: UniRESConfig, batch_size: int, seq_len: int | None = None, seed: int = 0) -> dict:
  """numpy batch [B, ...] with a random image, random boxes (some padded), text and a `[SEG]` answer."""
  rng = np.random.default_rng(seed)
  s_low, s_high = cfg.vit.image_size, cfg.high_res_size
  n_obj, n_part = cfg.vision_flow.max_object_boxes, cfg.vision_flow.max_part_boxes
  vocab = cfg.llm.vocab_size
  prefix = prompt_length(cfg)
  seq_len = seq_len or min(cfg.llm.max_seq_len, prefix + 16)
  if seq_len < prefix + 6:
    raise ValueError(f"seq_len {seq_len} leaves no room for text after the {prefix} visual prompt tokens")

  def boxes(n):
    xy0 = rng.uniform(0, s_high * 0.6, size=(batch_size, n, 2))
    wh = rng.uniform(s_high * 0.1, s_high * 0.4, size=(batch_size, n, 2))
    return np.concatenate([xy0, np.minimum(xy0 + wh, s_high)], -1).astype(np.float32)

  object_box_mask = np.arange(n_obj)[None, :] < rng.integers(min(1, n_obj), n_obj + 1, size=(batch_size, 1))
  part_box_mask = np.arange(n_part)[None, :] < rng.integers(0, n_part + 1, size=(batch_size, 1))

  # Ids 0..9 stand for pad/bos/eos and the special tokens; text ids are drawn above them.
  pad_id, bos_id, seg_id = 0, 1, 3
  input_ids = np.full((batch_size, seq_len), pad_id, np.int32)
  token_type = np.zeros((batch_size, seq_len), np.int32)
  attention_mask = np.zeros((batch_size, seq_len), bool)
  loss_mask = np.zeros((batch_size, seq_len), np.float32)
  seg_index = np.zeros((batch_size,), np.int32)
  has_target = rng.random(batch_size) < 0.8
  for b in range(batch_size):
    layout = [(bos_id, 0), (4, 0)] + [(5, TOKEN_IMAGE)] * cfg.num_image_tokens + [(6, 0), (7, 0)]
    layout += [(8, TOKEN_OBJECT)] * n_obj + [(6, 0), (9, 0)] + [(8, TOKEN_PART)] * n_part + [(6, 0)]
    text_len = int(rng.integers(2, seq_len - prefix - 3))
    text = [(int(t), 0) for t in rng.integers(10, vocab, size=text_len)]
    answer = [(seg_id, 0), (2, 0)] if has_target[b] else [(int(rng.integers(10, vocab)), 0), (2, 0)]
    sequence = layout + text + answer
    n = len(sequence)
    input_ids[b, :n] = [t for t, _ in sequence]
    token_type[b, :n] = [k for _, k in sequence]
    attention_mask[b, :n] = True
    answer_start = len(layout) + text_len
    loss_mask[b, answer_start - 1:n - 1] = 1.0
    if has_target[b]:
      seg_index[b] = answer_start - 1
  target_ids = np.concatenate([input_ids[:, 1:], np.full((batch_size, 1), pad_id, np.int32)], axis=1)
  gt_mask = np.zeros((batch_size, s_high, s_high), np.float32)
  for b in range(batch_size):
    if has_target[b]:
      y0, x0 = rng.integers(0, s_high // 2, size=2)
      gt_mask[b, y0:y0 + s_high // 3, x0:x0 + s_high // 3] = 1.0
  return {
      "image_low": rng.normal(size=(batch_size, s_low, s_low, 3)).astype(np.float32),
      "image_high": rng.normal(size=(batch_size, s_high, s_high, 3)).astype(np.float32),
      "object_boxes": boxes(n_obj), "object_box_mask": object_box_mask,
      "part_boxes": boxes(n_part), "part_box_mask": part_box_mask,
      "input_ids": input_ids, "token_type": token_type, "attention_mask": attention_mask,
      "target_ids": target_ids, "loss_mask": loss_mask, "seg_index": seg_index, "has_target": has_target,
      "gt_mask": gt_mask, "sample_index": np.arange(batch_size, dtype=np.int32),
  }


def abstract_batch(model_cfg: Any, batch_size: int, seq_len: int | None = None) -> dict:
  """Shapes and dtypes of a batch of `batch_size` for a `model` config section, with no data."""
  cfg = UniRESConfig.from_config(model_cfg)
  batch = example_batch(cfg, 1, seq_len)
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype) for k, v in batch.items()}
