"""One checkpoint held for the demo's lifetime: loaded once, its jitted predict function built once and warmed up.

Every request goes through `DemoModel._run_model`, which calls the `Predictor` that `scripts/predict.py` uses
(prompt batch → padded to the mesh → generation → mask at the image's size, boxes from the run's source). The prompt has
a fixed token budget (`data.max_text_len`), so `fit_phrase` shortens a phrase that would not fit, and says so.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from unires_jax import proposals as proposals_lib
from unires_jax.data import pipeline
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.eval import predictor as predictor_lib

log = logging.getLogger(__name__)

WARM_UP_SIZE = (64, 64)  # (height, width) of the blank image the start-up request runs on


@dataclasses.dataclass(frozen=True)
class ModelOutput:
  """What the model says about one image and phrase."""
  mask: np.ndarray                        # bool [h, w], at the image's size; empty without `[SEG]`
  answer: str                             # the generated text, cut at end-of-sequence
  has_seg: bool                           # the answer holds `[SEG]` (False: "no such target")
  proposals: proposals_lib.ImageProposals  # the boxes the model read, in image pixels


@dataclasses.dataclass(frozen=True)
class FittedPhrase:
  """The phrase the model is given, and a note when it had to be shortened to fit the prompt budget."""
  text: str
  note: str = ""


class PromptBudget:
  """The prompt's token budget (`data.max_text_len`) and the phrases that fit it, with the run's tokenizer and its
  first instruction template (the one evaluation and `scripts/predict.py` use)."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, layout: pipeline.Layout, instruction: str):
    self.tokenizer, self.layout, self.instruction = tokenizer, layout, instruction

  @classmethod
  def from_config(cls, config, tokenizer: tokenizer_lib.Tokenizer) -> PromptBudget:
    data = pipeline.DataConfig(**config.data.to_dict())
    return cls(tokenizer, pipeline.Layout.from_config(config), data.instruction_templates[0])

  def prompt_length(self, phrase: str) -> int:
    """Tokens of the whole prompt (visual prefix, instruction with `phrase`, `ASSISTANT:`)."""
    ids, _ = pipeline.prompt_ids(self.tokenizer, self.layout, self.instruction.format(phrase=phrase.strip()))
    return len(ids)

  def fit(self, phrase: str) -> FittedPhrase:
    """`phrase` stripped, or its longest run of leading words whose prompt fits `data.max_text_len` (the leading
    characters when not even one word fits), with a note saying what was cut."""
    phrase = phrase.strip()
    budget = self.layout.max_text_len
    needed = self.prompt_length(phrase)
    if needed <= budget:
      return FittedPhrase(phrase)
    words = phrase.split()
    # Pieces do not cross spaces, so tokens grow with every word: the fitting word counts are a prefix range.
    count = _longest_fitting(len(words), lambda n: self.prompt_length(" ".join(words[:n])) <= budget)
    if count:
      cut, what = " ".join(words[:count]), f"cut from {len(words)} to {count} words"
    else:
      cut = words[0][:_longest_fitting(len(words[0]), lambda n: self.prompt_length(words[0][:n]) <= budget)]
      what = f"cut to the first {len(cut)} characters of its first word"
    if not cut:
      raise ValueError(f"the prompt leaves no room for any phrase within data.max_text_len = {budget} tokens")
    return FittedPhrase(cut, f"The phrase was longer than the model's text budget ({budget} prompt tokens, "
                             f"{needed} needed): {what}; the model read {cut!r}.")


def _longest_fitting(upper: int, fits) -> int:
  """The largest n in [0, upper) with fits(n), for a `fits` true up to some n and false after (binary search)."""
  low, high = 0, upper  # fits(low) holds (n = 0: the empty prefix) and fits(high) does not
  while high - low > 1:
    middle = (low + high) // 2
    if fits(middle):
      low = middle
    else:
      high = middle
  return low


class DemoModel:
  """A run's checkpoint through `eval.predictor.Predictor` (loaded once, one jitted predict function), warm after
  construction; requests are answered one at a time."""

  def __init__(self, checkpoint: str, step: int | None = None, max_new_tokens: int | None = None):
    started = time.perf_counter()
    self.predictor = predictor_lib.Predictor(checkpoint, step=step, batch_size=1, max_new_tokens=max_new_tokens)
    self.config = self.predictor.config
    self.checkpoint, self.step = self.predictor.checkpoint, self.predictor.step
    self.tokenizer = self.predictor.tokenizer
    self.budget = PromptBudget.from_config(self.config, self.tokenizer)
    self.proposals_note = self.predictor.source_note
    self.load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    self._run_model(np.zeros(WARM_UP_SIZE + (3,), np.uint8), "warm up")  # compiles now, not on the first request
    self.warm_up_seconds = time.perf_counter() - started
    log.info("loaded %s step %s in %.1f s, warm-up (compilation) %.1f s", self.checkpoint, self.step,
             self.load_seconds, self.warm_up_seconds)

  def describe(self) -> str:
    """Which checkpoint and which boxes every result on the page was made with."""
    return f"checkpoint {self.checkpoint} step {self.step}; {self.proposals_note}"

  def fit_phrase(self, phrase: str) -> FittedPhrase:
    return self.budget.fit(phrase)

  def _run_model(self, pixels: np.ndarray, phrase: str) -> ModelOutput:
    """uint8 [h, w, 3] and a fitted phrase → the model's mask, answer and the boxes it read (the Predictor that
    `scripts/predict.py` runs, with the run's proposal source)."""
    result, = self.predictor.predict([np.asarray(pixels, np.uint8)], [phrase])
    objects = np.asarray(result.proposals["object"], np.float32).reshape(-1, 4)
    parts = np.asarray(result.proposals["part"], np.float32).reshape(-1, 4)
    proposals = proposals_lib.ImageProposals(objects, parts, np.ones((len(objects),), np.float32),
                                             np.ones((len(parts),), np.float32))
    return ModelOutput(mask=result.mask, answer=result.answer, has_seg=not result.no_target, proposals=proposals)
