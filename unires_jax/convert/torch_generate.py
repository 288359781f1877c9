"""Generation and prediction with `UniRESTorch`, as `unires_jax/eval/inference.py` does it in JAX, without JAX.

`generate`: the prompt (tokens up to the position that predicts the first answer token, `loss_mask`) prefills
transformers' KV cache (`DynamicCache`) with right-padded rows masked; then one greedy token per step, rows that
emitted `</s>` masked from then on. Rotary positions are the real tokens before each slot, continued per row, as
the JAX decoder counts them. The first `[SEG]` a row generates is decoded into a mask from the hidden state that
*predicted* it; a row with no `[SEG]` is no-target (empty mask).

`Predictor` wraps an export for raw images and phrases: the prompt batch of `data/prompts.py` (the same
preprocessing, prompt and proposal handling as `eval/inference.py::make_prompt_batch`), generation, and masks at
the original size.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
import torch

from unires_jax.data import prompts, transforms
from unires_jax.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"


@torch.no_grad()
def generate(model, batch: Mapping[str, torch.Tensor], seg_id: int, eos_id: int, pad_id: int,
             max_new_tokens: int = 16) -> dict[str, torch.Tensor]:
  """→ {'mask_logits' [B, S, S], 'has_seg' [B], 'tokens' [B, T], 'iou_pred' [B]} (`inference.make_generate_fn`)."""
  from transformers import DynamicCache

  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  input_ids, token_type = batch["input_ids"].long(), batch["token_type"]
  batch_size, seq_len = input_ids.shape
  max_seq_len = model.config["llm"]["max_seq_len"]
  if seq_len + max_new_tokens > max_seq_len:
    raise ValueError(f"prompt length {seq_len} + max_new_tokens {max_new_tokens} exceeds "
                     f"model.llm.max_seq_len={max_seq_len}")
  end = torch.argmax((batch["loss_mask"] > 0).int(), dim=1)  # [B] the last prompt position
  prompt_mask = batch["attention_mask"].bool() & (torch.arange(seq_len)[None, :] <= end[:, None])  # [B, L]
  vision = model.encode_vision(batch)
  embeds, mask = model.embed_sequence(input_ids, token_type, prompt_mask, vision, batch["object_box_mask"],
                                      batch["part_box_mask"])
  positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
  cache = DynamicCache()
  hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
                           past_key_values=cache, use_cache=True).last_hidden_state  # [B, L, D]
  rows = torch.arange(batch_size)
  predicting = hidden[rows, end]  # [B, D]: the state that predicts the next token
  token = model.llm.lm_head(predicting).float().argmax(dim=-1)  # [B]
  num_real = mask.long().sum(dim=1)  # [B] real tokens in the cache
  full_mask = mask
  done = torch.zeros(batch_size, dtype=torch.bool)
  has_seg = torch.zeros(batch_size, dtype=torch.bool)
  seg_hidden = torch.zeros_like(predicting)
  emitted_tokens = []
  embed = model.llm.get_input_embeddings()
  for step in range(max_new_tokens):
    active = ~done
    is_seg = (token == seg_id) & active & ~has_seg
    seg_hidden = torch.where(is_seg[:, None], predicting, seg_hidden)
    has_seg = has_seg | is_seg
    emitted = torch.where(active, token, torch.full_like(token, pad_id))
    emitted_tokens.append(emitted)
    done = done | (active & (token == eos_id))
    if step == max_new_tokens - 1:
      break
    full_mask = torch.cat([full_mask, active[:, None]], dim=1)  # [B, L + step + 1]
    step_hidden = model.llm.model(inputs_embeds=embed(emitted[:, None]), attention_mask=full_mask.long(),
                                  position_ids=num_real[:, None], past_key_values=cache,
                                  use_cache=True).last_hidden_state  # [B, 1, D]
    num_real = num_real + active.long()
    predicting = step_hidden[:, 0]
    token = model.llm.lm_head(predicting).float().argmax(dim=-1)
  mask_logits, iou = model.decode_masks(seg_hidden, hidden, token_type, mask, vision["dense"])
  return {"mask_logits": mask_logits, "has_seg": has_seg, "tokens": torch.stack(emitted_tokens, dim=1),
          "iou_pred": iou}


def prompt_config(model_config: Mapping[str, Any], prompt: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The `model` + `data` sections `prompts.Layout.from_config` reads, from an export's `config.json`."""
  data = {key: prompt[key] for key in ("max_text_len", "prompt_style", "system_prompt")}
  return ml_collections.ConfigDict({"model": dict(model_config), "data": data})


class Predictor:
  """Masks for raw images and phrases with an exported model (`UniRESTorch.from_exported(OUT).predictor()`)."""

  def __init__(self, model, prompt: Mapping[str, Any], tokenizer: tokenizer_lib.Tokenizer):
    self.model, self.prompt, self.tokenizer = model, dict(prompt), tokenizer
    self.layout = prompts.Layout.from_config(prompt_config(model.config, prompt))

  def prompt_batch(self, images: Sequence[np.ndarray], phrases: Sequence[str],
                   boxes: Sequence[Mapping[str, Any] | None] | None = None) -> dict[str, np.ndarray]:
    return prompts.prompt_batch(self.layout, self.tokenizer, self.prompt["instruction_template"], images, phrases,
                                boxes)

  def predict_batch(self, images: Sequence[np.ndarray], phrases: Sequence[str],
                    boxes: Sequence[Mapping[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    """Per image: {'mask': bool [h, w], 'no_target', 'answer', 'iou_pred', 'mask_logits' (canvas, float32)}."""
    batch = self.prompt_batch(images, phrases, boxes)
    special = self.tokenizer.special_ids
    out = generate(self.model, {k: torch.from_numpy(v) for k, v in batch.items()},
                   special[tokenizer_lib.SEG_TOKEN], self.tokenizer.eos_id, self.tokenizer.pad_id,
                   int(self.prompt["max_new_tokens"]))
    results = []
    for row, pixels in enumerate(images):
      height, width = np.asarray(pixels).shape[:2]
      logits = out["mask_logits"][row].float().numpy()
      has_seg = bool(out["has_seg"][row])
      ids = []
      for token in out["tokens"][row].tolist():
        if token == self.tokenizer.eos_id:
          break
        ids.append(token)
      mask = (transforms.mask_logits_to_original(logits, height, width) if has_seg
              else np.zeros((height, width), bool))
      results.append({"mask": mask, "no_target": not has_seg, "answer": self.tokenizer.decode(ids),
                      "iou_pred": float(out["iou_pred"][row]), "mask_logits": logits})
    return results

  def predict(self, image: np.ndarray, text: str, boxes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One uint8 [h, w, 3] image and phrase (boxes: {'object': [[x0, y0, x1, y1], ...], 'part': [...]})."""
    return self.predict_batch([image], [text], [boxes])[0]
