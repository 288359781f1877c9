"""Generation with the KV cache against greedy decoding recomputed from scratch with full forwards.

The reference feeds prompt + tokens generated so far through the teacher-forced model at every step and takes the
argmax at the last real position; the `[SEG]` mask is `decode_masks` on the hidden state that predicted `[SEG]`,
taken from that same full forward. Tiny model, random params, rows of different prompt lengths whose reference
answers (which generation must ignore) follow the prompt.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from unires_jax.data import prompts
from unires_jax.eval import inference
from unires_jax.models.example_batch import example_batch
from unires_jax.models.unires import UniRESConfig
from unires_jax.train import state as state_lib

MAX_NEW_TOKENS = 6
PAD_ID = 0


@pytest.fixture(scope="module")
def setup():
  model_cfg = common.model_config("tiny")
  model = state_lib.build_model(model_cfg)
  batch = example_batch(UniRESConfig.from_config(model_cfg), 4, seq_len=64, seed=3)
  params = _random_params(model, batch)
  free_generate = jax.jit(inference.make_generate_fn(model, seg_id=-1, eos_id=-1, pad_id=PAD_ID,
                                                     max_new_tokens=MAX_NEW_TOKENS))
  free_tokens = np.asarray(free_generate(params, batch)["tokens"])  # [B, T]: no [SEG], no </s>
  return dict(model=model, params=params, batch=batch, forward=_full_forward(model), free_generate=free_generate,
              free_tokens=free_tokens)


def _random_params(model, batch) -> dict:
  """Random params of the model's shapes without compiling its init (norm scales near 1, the rest N(0, 0.05^2))."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    values = rng.normal(0.0, 0.05, leaf.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      values = 1.0 + 2 * values
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _extended(batch, generated: np.ndarray, total_len: int) -> tuple[dict, np.ndarray]:
  """Prompt (up to its end) + `generated` [B, t] tokens, right-padded to `total_len`; and the prompt ends [B]."""
  end = np.argmax(batch["loss_mask"] > 0, axis=1)  # [B]
  size = batch["input_ids"].shape[0]
  input_ids = np.full((size, total_len), PAD_ID, np.int32)
  token_type = np.zeros((size, total_len), np.int32)
  attention_mask = np.zeros((size, total_len), bool)
  for b in range(size):
    prompt = batch["input_ids"][b, :end[b] + 1]
    sequence = np.concatenate([prompt, generated[b]])
    input_ids[b, :len(sequence)] = sequence
    token_type[b, :end[b] + 1] = batch["token_type"][b, :end[b] + 1]
    attention_mask[b, :len(sequence)] = True
  extended = dict(batch, input_ids=input_ids, token_type=token_type, attention_mask=attention_mask,
                  target_ids=np.zeros_like(input_ids), loss_mask=np.zeros((size, total_len), np.float32),
                  seg_index=np.zeros((size,), np.int32))
  return extended, end


def _full_forward(model):
  def forward(params, batch, seg_positions):
    def run(m, batch):
      vision = m.encode_vision(batch)
      embeds, mask = m.embed_sequence(batch["input_ids"], batch["token_type"], batch["attention_mask"], vision,
                                      batch["object_box_mask"], batch["part_box_mask"])
      hidden = m.run_llm(embeds, mask)  # [B, L, D]
      seg_hidden = jnp.take_along_axis(hidden, seg_positions[:, None, None], axis=1)[:, 0]  # [B, D]
      mask_logits, iou_pred = m.decode_masks(seg_hidden, hidden, batch["token_type"], mask, vision["dense"])
      return m.lm_logits(hidden), mask_logits, iou_pred
    return model.apply({"params": params}, batch, method=run)
  return jax.jit(forward)


def _reference_greedy(forward, params, batch, eos_id: int) -> np.ndarray:
  """[B, T] tokens of greedy decoding with a full forward per step; after `eos_id` a row emits the pad id."""
  size, seq_len = batch["input_ids"].shape
  total = seq_len + MAX_NEW_TOKENS
  tokens = np.full((size, MAX_NEW_TOKENS), PAD_ID, np.int32)
  done = np.zeros((size,), bool)
  for step in range(MAX_NEW_TOKENS):
    extended, end = _extended(batch, [tokens[b, :step] for b in range(size)], total)
    logits, _, _ = forward(params, extended, np.zeros((size,), np.int32))
    for b in range(size):
      if done[b]:
        continue
      tokens[b, step] = int(np.argmax(np.asarray(logits[b, end[b] + step])))
      done[b] = tokens[b, step] == eos_id
  return tokens


def _split_token(tokens: np.ndarray, exclude: set[int]) -> int:
  """A token some rows generate and others do not, preferring one first generated after step 0."""
  candidates = []
  for token in np.unique(tokens):
    if int(token) in exclude:
      continue
    rows = (tokens == token).any(axis=1)
    if rows.any() and not rows.all():
      first = min(int(np.flatnonzero(row == token)[0]) for row in tokens[rows])
      candidates.append((first == 0, int(token)))
  assert candidates, f"random params generated no token that separates the rows: {tokens}"
  return sorted(candidates)[0][1]


def test_generation_with_cache_equals_full_forward_greedy(setup):
  params, batch, tokens = setup["params"], setup["batch"], setup["free_tokens"]
  ends = np.argmax(batch["loss_mask"] > 0, axis=1)
  assert len(set(ends.tolist())) > 1, "rows must have different prompt lengths"
  np.testing.assert_array_equal(tokens, _reference_greedy(setup["forward"], params, batch, eos_id=-1))


def test_seg_mask_and_eos_match_the_recomputed_reference(setup):
  model, params, batch, forward = setup["model"], setup["params"], setup["batch"], setup["forward"]
  free_tokens = setup["free_tokens"]
  # Ids the random model happens to generate in some rows only stand for [SEG] and </s>.
  seg_id = _split_token(free_tokens, exclude={PAD_ID})
  eos_id = _split_token(free_tokens, exclude={PAD_ID, seg_id})
  generate = jax.jit(inference.make_generate_fn(model, seg_id=seg_id, eos_id=eos_id, pad_id=PAD_ID,
                                                max_new_tokens=MAX_NEW_TOKENS))
  out = jax.device_get(generate(params, batch))
  reference = _reference_greedy(forward, params, batch, eos_id=eos_id)
  np.testing.assert_array_equal(out["tokens"], reference)

  size, seq_len = batch["input_ids"].shape
  expected_has_seg = np.array([seg_id in row.tolist() for row in reference])
  assert expected_has_seg.any() and not expected_has_seg.all()
  np.testing.assert_array_equal(out["has_seg"], expected_has_seg)

  # The hidden state that predicted [SEG]: position end + k for the k-th generated token.
  extended, end = _extended(batch, list(reference), seq_len + MAX_NEW_TOKENS)
  first_seg = np.array([row.tolist().index(seg_id) if seg_id in row.tolist() else 0 for row in reference])
  _, mask_logits, iou_pred = forward(params, extended, (end + first_seg).astype(np.int32))
  rows = np.flatnonzero(expected_has_seg)
  scale = np.abs(np.asarray(mask_logits)[rows]).max()  # random params give small logits: errors are relative
  np.testing.assert_allclose(out["mask_logits"][rows], np.asarray(mask_logits)[rows], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(out["iou_pred"][rows], np.asarray(iou_pred)[rows], rtol=1e-5, atol=1e-6)
  # The mask really depends on which hidden state prompts it: one step earlier gives another mask.
  earlier = np.maximum(end + first_seg - 1, 0).astype(np.int32)
  _, other_logits, _ = forward(params, extended, earlier)
  assert np.abs(np.asarray(other_logits)[rows] - out["mask_logits"][rows]).max() > 1e-3 * scale


def test_answer_tokens_after_the_prompt_do_not_change_generation(setup):
  params, batch, generate = setup["params"], setup["batch"], setup["free_generate"]
  scrambled = dict(batch)
  end = np.argmax(batch["loss_mask"] > 0, axis=1)
  ids = batch["input_ids"].copy()
  rng = np.random.default_rng(1)
  for b in range(len(ids)):
    ids[b, end[b] + 1:] = rng.integers(10, 500, size=ids.shape[1] - end[b] - 1)
  scrambled["input_ids"] = ids
  scrambled["attention_mask"] = np.ones_like(batch["attention_mask"])
  np.testing.assert_array_equal(setup["free_tokens"], np.asarray(generate(params, scrambled)["tokens"]))


def test_prompt_too_long_for_the_cache_is_an_error(setup):
  model, params, batch = setup["model"], setup["params"], setup["batch"]
  generate = inference.make_generate_fn(model, seg_id=3, eos_id=2, pad_id=PAD_ID, max_new_tokens=100)
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(params, batch)


def test_decode_answers_cuts_at_eos():
  class FakeTokenizer:
    eos_id = 2

    def decode(self, ids):
      return " ".join(str(i) for i in ids)

  tokens = np.array([[5, 6, 2, 7], [8, 9, 10, 11]])
  assert inference.decode_answers(tokens, FakeTokenizer()) == ["5 6", "8 9 10 11"]


def test_each_row_alone_generates_what_it_generates_in_the_batch(setup):
  """Padding-safety at the model level: rows of different prompt lengths share a batch without seeing each other."""
  params, batch, generate = setup["params"], setup["batch"], setup["free_generate"]
  together = jax.device_get(generate(params, batch))
  for row in range(batch["input_ids"].shape[0]):
    alone = jax.device_get(generate(params, {k: v[row:row + 1] for k, v in batch.items()}))
    np.testing.assert_array_equal(alone["tokens"][0], together["tokens"][row])
    scale = np.abs(together["mask_logits"][row]).max()
    np.testing.assert_allclose(alone["mask_logits"][0], together["mask_logits"][row], rtol=1e-5, atol=1e-5 * scale)


def test_kept_boxes_are_the_pipelines_choice_larger_first():
  boxes = np.array([[0, 0, 1, 1], [0, 0, 5, 5], [0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 3, 3], [0, 0, 6, 1]], np.float32)
  np.testing.assert_array_equal(prompts.kept_boxes(boxes, 4), boxes[[1, 3, 4, 5]])  # areas 25, 16, 9, 6
  np.testing.assert_array_equal(prompts.kept_boxes(boxes[:3], 4), boxes[:3])  # all fit: kept in order
  assert prompts.kept_boxes(None, 4).shape == (0, 4)
