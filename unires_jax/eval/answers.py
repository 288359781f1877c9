"""What a generated answer says: a target (it holds `[SEG]`), no target (a no-target answer), or invalid.

An answer is the generated text up to the first `</s>` (or the token limit). It is
- `target` when it holds the `[SEG]` token (its id, not text that reads "[SEG]"): the first one prompts the mask;
- `no-target` when it holds no `[SEG]` and equals one of the run's `data.no_target_answer_templates`, with
  `{phrase}` filled by the sample's phrase, compared after lower-casing and collapsing white space;
- `invalid` otherwise (no `[SEG]` and no no-target answer: garbage, or a no-target answer cut by the token limit).
Invalid answers are counted (`invalid` in metrics.json and metrics.md) and scored as empty masks, like no-target
answers (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from unires_jax.data import tokenizer as tokenizer_lib

TARGET, NO_TARGET, INVALID = "target", "no-target", "invalid"
KINDS = (TARGET, NO_TARGET, INVALID)


def _normalise(text: str) -> str:
  return " ".join(text.lower().split())


def answer_ids(tokens: np.ndarray, eos_id: int) -> list[int]:
  """Generated ids [T] cut before the first end-of-sequence."""
  ids = []
  for token in np.asarray(tokens).reshape(-1).tolist():
    if token == eos_id:
      break
    ids.append(int(token))
  return ids


@dataclasses.dataclass(frozen=True)
class AnswerParser:
  """Classifies generated answers against the run's no-target answer templates."""
  tokenizer: tokenizer_lib.Tokenizer
  no_target_templates: tuple[str, ...]

  @classmethod
  def from_config(cls, config, tokenizer: tokenizer_lib.Tokenizer) -> "AnswerParser":
    return cls(tokenizer, tuple(config.data.no_target_answer_templates))

  def text(self, tokens: np.ndarray) -> str:
    return self.tokenizer.decode(answer_ids(tokens, self.tokenizer.eos_id))

  def kind(self, text: str, has_seg: bool, phrase: str) -> str:
    """TARGET, NO_TARGET or INVALID for one answer: its decoded text, whether generation emitted the `[SEG]` id,
    and the sample's phrase."""
    if has_seg:
      return TARGET
    answer = _normalise(text)
    expected = {_normalise(template.format(phrase=phrase.strip())) for template in self.no_target_templates}
    return NO_TARGET if answer in expected else INVALID

  def kinds(self, tokens: np.ndarray, has_seg: Sequence[bool], phrases: Sequence[str]) -> list[str]:
    """One kind per row of generated ids [B, T]."""
    return [self.kind(self.text(row), bool(seg), phrase)
            for row, seg, phrase in zip(np.asarray(tokens), has_seg, phrases)]
