"""What a person hands to inference, checked before the model sees it: the phrase and the boxes.

- A phrase that is empty or only whitespace is refused (it would run as "segment nothing in particular").
- A phrase whose prompt exceeds the model's text budget (`data.max_text_len`) is refused with its length and the
  limit, quoting only its start; `truncate=True` (the demo) cuts it at a word boundary to fit and says so.
- Boxes must be `[x0, y0, x1, y1]` of finite numbers with x1 >= x0 and y1 >= y0; each bad one is named.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from unires_jax.errors import UserError

QUOTED_CHARS = 60  # how much of a refused phrase an error message quotes


class InputError(UserError, ValueError):
  """A phrase or box that cannot be used, named with what was expected."""


def quote(phrase: str, limit: int = QUOTED_CHARS) -> str:
  """The phrase in quotes, cut to `limit` characters with its full length when longer."""
  if len(phrase) <= limit:
    return repr(phrase)
  return f"{phrase[:limit]!r}... ({len(phrase)} characters)"


def clean_phrase(phrase: Any, where: str) -> str:
  """The phrase without surrounding whitespace; an `InputError` when it is not text or nothing is left."""
  if not isinstance(phrase, str):
    raise InputError(f"{where}: the phrase must be text, got {type(phrase).__name__}")
  cleaned = phrase.strip()  # as the pipeline reads a sentence; inner spacing is the tokenizer's business
  if not cleaned:
    raise InputError(f"{where}: the phrase {quote(phrase)} is empty or only whitespace; expected words naming "
                     f"what to segment")
  return cleaned


def fit_phrase(phrase: str, prompt_tokens: Callable[[str], int], limit: int, where: str,
               truncate: bool = False) -> tuple[str, str | None]:
  """(phrase, note): the cleaned phrase if its prompt (`prompt_tokens(phrase)` tokens) fits `limit`.

  Too long: an `InputError` with the phrase's length and the limit, or with `truncate` the longest prefix of whole
  words that fits and a note saying what was cut.
  """
  phrase = clean_phrase(phrase, where)
  needed = prompt_tokens(phrase)
  if needed <= limit:
    return phrase, None
  words = phrase.split(" ")
  low, high = 0, len(words)  # the longest fitting prefix has `low` words: binary search on the word count
  while low < high:
    middle = (low + high + 1) // 2
    if prompt_tokens(" ".join(words[:middle])) <= limit:
      low = middle
    else:
      high = middle - 1
  if not truncate or low == 0:
    room = "" if low == 0 else f" (about {low} of its {len(words)} words fit)"
    raise InputError(f"{where}: the phrase {quote(phrase)} makes a prompt of {needed} tokens; the limit is "
                     f"data.max_text_len = {limit}{room}. Shorten the phrase.")
  kept = " ".join(words[:low])
  return kept, (f"the phrase was cut to its first {low} of {len(words)} words to fit the model's text budget "
                f"({limit} tokens)")


def check_boxes(boxes: Any, where: str) -> np.ndarray:
  """float32 [N, 4] from a list of `[x0, y0, x1, y1]`; an `InputError` naming the first bad box."""
  if boxes is None:
    return np.zeros((0, 4), np.float32)
  if not isinstance(boxes, (list, tuple, np.ndarray)):
    raise InputError(f"{where}: expected a list of [x0, y0, x1, y1] boxes, got {type(boxes).__name__}")
  checked = []
  for index, box in enumerate(boxes):
    at = f"{where}[{index}]"
    values = list(box) if isinstance(box, (list, tuple, np.ndarray)) else None
    if values is None or len(values) != 4 or not all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
      raise InputError(f"{at}: a box must be [x0, y0, x1, y1] (4 numbers), got {box!r}")
    if not all(math.isfinite(float(v)) for v in values):
      raise InputError(f"{at}: box {box!r} holds NaN or infinity")
    x0, y0, x1, y1 = (float(v) for v in values)
    if x1 < x0 or y1 < y0:
      raise InputError(f"{at}: box {box!r} has x1 < x0 or y1 < y0; expected [x0, y0, x1, y1] with the corner "
                       f"(x0, y0) above and left of (x1, y1)")
    checked.append([x0, y0, x1, y1])
  return np.asarray(checked, np.float32).reshape(-1, 4)
