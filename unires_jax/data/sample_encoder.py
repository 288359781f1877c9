"""One sample → one batch element: images, boxes on the canvas, the packed prompt and answer, the mask.

The choices (box selection, too-long samples, the answer span) are documented in docs/data_pipeline.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from unires_jax.data import records as records_lib
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.data import transforms
from unires_jax.data import proposal_noise as noise_lib
from unires_jax.data.data_config import DataConfig
from unires_jax.data.prompts import (OBJECT_SLOT, PART_SLOT, TEXT, Layout, canvas_boxes, granularity_boxes,
                                     prompt_ids, select_boxes)

# Private per-sample counters; the pipeline's last stage (`pipeline._CountAndStrip`, in the main process) sums and
# removes them.
_COUNTER_KEYS = ("_dropped_object_boxes", "_dropped_part_boxes", "_too_long")


def _pack(tokenizer: tokenizer_lib.Tokenizer, length: int, ids: list[int], types: list[int],
          answer_start: int, decision_weight: float = 1.0) -> dict[str, np.ndarray]:
  """Right-pads a sequence that fits into `length` and derives the shifted targets and the answer's loss mask.

  The position that predicts the answer's first token weighs `decision_weight`, the others 1: with the default
  templates (configs/data_common.py) that token alone says target ("Sure", "It") or no target ("Sorry", "There")."""
  used = len(ids)
  input_ids = np.full((length,), tokenizer.pad_id, np.int32)  # [L]
  input_ids[:used] = ids
  token_type = np.zeros((length,), np.int32)  # [L]
  token_type[:used] = types
  attention_mask = np.zeros((length,), bool)  # [L]
  attention_mask[:used] = True
  target_ids = np.full((length,), tokenizer.pad_id, np.int32)  # [L]
  target_ids[:-1] = input_ids[1:]
  loss_mask = np.zeros((length,), np.float32)  # [L]
  loss_mask[answer_start - 1:used - 1] = 1.0  # the positions whose next token is in the answer span
  if answer_start - 1 < used - 1:
    loss_mask[answer_start - 1] = decision_weight
  seg_id = tokenizer.special_ids[tokenizer_lib.SEG_TOKEN]
  seg_positions = np.flatnonzero(input_ids[answer_start:used] == seg_id)
  seg_index = answer_start + int(seg_positions[0]) - 1 if seg_positions.size else 0
  return dict(input_ids=input_ids, token_type=token_type, attention_mask=attention_mask, target_ids=target_ids,
              loss_mask=loss_mask, seg_index=np.int32(seg_index))


def encode_text(tokenizer: tokenizer_lib.Tokenizer, layout: Layout, instruction: str,
                answer: str, decision_weight: float = 1.0) -> dict[str, np.ndarray] | None:
  """Token arrays of one sample, each [L]; None when prompt + answer + `</s>` exceed `max_text_len`.

  The answer span is the answer's tokens and `</s>`; `loss_mask` is 1 at the positions that predict them
  (`decision_weight` at the one that predicts the first, see `_pack`).
  """
  ids, types = prompt_ids(tokenizer, layout, instruction)
  answer_ids = tokenizer.encode(answer) + [tokenizer.eos_id]
  if len(ids) + len(answer_ids) > layout.max_text_len:
    return None
  return _pack(tokenizer, layout.max_text_len, ids + answer_ids, types + [TEXT] * len(answer_ids), len(ids),
               decision_weight)


def inert_text(tokenizer: tokenizer_lib.Tokenizer, layout: Layout, instruction: str) -> dict[str, np.ndarray]:
  """A too-long sample's stand-in: its prompt cut to `max_text_len`, no answer, so no loss and no `[SEG]`."""
  ids, types = prompt_ids(tokenizer, layout, instruction)
  length = layout.max_text_len
  text = _pack(tokenizer, length, ids[:length], types[:length], answer_start=length + 1)
  text["loss_mask"][:] = 0.0
  return text


decode_image = records_lib.decode_image


class SampleEncoder:
  """Loads one sample of one split and turns it into a batch element. Picklable (workers reopen the files)."""

  def __init__(self, split_dirs: Sequence[str], tokenizer_path: str, data: DataConfig, layout: Layout,
               train: bool):
    self.split_dirs = tuple(split_dirs)
    self.tokenizer_path = tokenizer_path
    self.data = data
    self.layout = layout
    self.train = train
    self._sources: list[records_lib.SplitSource] | None = None
    self._tokenizer: tokenizer_lib.Tokenizer | None = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sources"] = state["_tokenizer"] = None
    return state

  @property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self._tokenizer is None:
      self._tokenizer = tokenizer_lib.Tokenizer(self.tokenizer_path)
    return self._tokenizer

  def source(self, split: int) -> records_lib.SplitSource:
    if self._sources is None:
      self._sources = [records_lib.SplitSource(d) for d in self.split_dirs]
    return self._sources[split]

  def __call__(self, element: tuple[int, int], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    split, sample_index = (int(v) for v in element)
    padding = sample_index < 0  # eval padding rows repeat sample 0 under sample_index -1
    sample = self.source(split).sample(0 if padding else sample_index)
    record, ref = sample["record"], sample["ref"]
    layout, data = self.layout, self.data
    height, width = int(record["height"]), int(record["width"])

    pixels = decode_image(record)
    out = dict(image_low=transforms.preprocess_image(pixels, layout.image_size_low),    # [S_l, S_l, 3]
               image_high=transforms.preprocess_image(pixels, layout.image_size_high))  # [S_h, S_h, 3]

    has_target = bool(ref["ann_ids"])
    pick = (lambda n: int(rng.integers(n))) if (self.train and rng is not None) else (lambda n: 0)
    phrase = sample["sentence"]["sent"].strip()
    instruction = data.instruction_templates[pick(len(data.instruction_templates))].format(phrase=phrase)
    answers = data.answer_templates if has_target else data.no_target_answer_templates
    answer = answers[pick(len(answers))].format(phrase=phrase)

    # Drawn after the templates, so switching the noise on leaves every sample's template choice unchanged.
    noise = data.proposal_noise if self.train else noise_lib.NoiseConfig(enabled=False)
    if noise.enabled and rng is None:
      raise ValueError("data.proposal_noise.enabled needs the training map's per-sample rng (random_map)")
    noise_rng = np.random.default_rng([noise.seed, int(rng.integers(2**63))]) if noise.enabled else None
    targets_first = data.targets_first and self.train
    dropped = {}
    for granularity, max_boxes in (("object", layout.max_object_boxes), ("part", layout.max_part_boxes)):
      boxes, is_target = granularity_boxes(record, ref, granularity, data.box_source)
      boxes, is_target = noise_lib.perturb(boxes, is_target, height, width, noise_rng, noise)
      kept, dropped[granularity] = select_boxes(boxes, is_target & targets_first, max_boxes)
      out[f"{granularity}_boxes"], out[f"{granularity}_box_mask"] = canvas_boxes(
          kept, height, width, layout.image_size_high, max_boxes)
    decision_weight = data.answer_decision_weight * (1.0 if has_target else data.no_target_decision_scale)
    text = encode_text(self.tokenizer, layout, instruction, answer, decision_weight if self.train else 1.0)
    too_long = text is None
    if too_long:
      ids = sample["ids"]
      if data.too_long == "error":
        raise ValueError(f"sample {sample_index} of {self.split_dirs[split]} (ref_id {ids['ref_id']}, sent_id "
                         f"{ids['sent_id']}): prompt and answer need more than data.max_text_len = "
                         f"{layout.max_text_len} tokens; raise max_text_len or set data.too_long='skip'")
      # An inert sample (no loss, no mask), marked like eval padding and counted.
      text = inert_text(self.tokenizer, layout, instruction)
      has_target, padding = False, True
    out.update(text)
    visual_masks = {OBJECT_SLOT: out["object_box_mask"], PART_SLOT: out["part_box_mask"]}
    for slot_type, box_mask in visual_masks.items():
      slots = np.flatnonzero(out["token_type"] == slot_type)
      out["attention_mask"][slots[:len(box_mask)]] &= box_mask

    if has_target:
      mask = records_lib.ground_truth_mask(record, ref)
      out["gt_mask"] = transforms.resize_mask(mask, layout.image_size_high)  # [S_h, S_h]
    else:
      out["gt_mask"] = np.zeros((layout.image_size_high, layout.image_size_high), np.float32)
    out["has_target"] = np.bool_(has_target)
    out["sample_index"] = np.int32(-1 if padding else sample_index)
    out["_dropped_object_boxes"] = np.int32(dropped["object"])
    out["_dropped_part_boxes"] = np.int32(dropped["part"])
    out["_too_long"] = np.int32(too_long)
    return out
