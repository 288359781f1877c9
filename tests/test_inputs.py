"""Phrases and boxes a person passes to inference: blank and over-long phrases, NaN and inverted boxes."""

from __future__ import annotations

import numpy as np
import pytest

from unires_jax.data import inputs


def count_words(phrase: str) -> int:
  """A stand-in tokenizer: 10 prompt tokens around the phrase, one per word."""
  return 10 + len(phrase.split())


@pytest.mark.parametrize("phrase", ["", "   ", "\t\n "])
def test_blank_phrases_are_refused(phrase):
  with pytest.raises(inputs.InputError, match="request 3: the phrase .* is empty or only whitespace"):
    inputs.clean_phrase(phrase, "request 3")


def test_surrounding_whitespace_is_dropped():
  assert inputs.clean_phrase("  the red  house \n", "x") == "the red  house"


def test_a_too_long_phrase_gives_its_length_and_the_limit_without_echoing_it():
  phrase = " ".join(["word"] * 1000)  # 4999 characters
  with pytest.raises(inputs.InputError) as caught:
    inputs.fit_phrase(phrase, count_words, limit=50, where="--text")
  message = str(caught.value)
  assert "prompt of 1010 tokens; the limit is data.max_text_len = 50" in message
  assert "(4999 characters)" in message and len(message) < 400
  assert "about 40 of its 1000 words fit" in message


def test_truncation_keeps_the_longest_prefix_that_fits():
  phrase = "the roof of the green house on the left"
  kept, note = inputs.fit_phrase(phrase, count_words, limit=15, where="demo", truncate=True)
  assert kept == "the roof of the green" and count_words(kept) == 15
  assert "first 5 of 9 words" in note
  assert inputs.fit_phrase("the roof", count_words, limit=15, where="demo", truncate=True) == ("the roof", None)


@pytest.mark.parametrize("boxes, message", [
    ([[float("nan"), 0, 10, 10]], r"boxes\[0\]: box \[nan, 0, 10, 10\] holds NaN or infinity"),
    ([[0, 0, 10, 10], [20, 5, 10, 30]], r"boxes\[1\]: box \[20, 5, 10, 30\] has x1 < x0 or y1 < y0"),
    ([["a", 1, 2, 3]], r"boxes\[0\]: a box must be \[x0, y0, x1, y1\] \(4 numbers\)"),
    ([[1, 2, 3]], r"boxes\[0\]: a box must be"),
])
def test_bad_boxes_are_named(boxes, message):
  with pytest.raises(inputs.InputError, match=message):
    inputs.check_boxes(boxes, "boxes")


def test_good_boxes_come_back_as_float32():
  np.testing.assert_array_equal(inputs.check_boxes([[0, 1, 2, 3.5]], "b"), np.array([[0, 1, 2, 3.5]], np.float32))
  assert inputs.check_boxes(None, "b").shape == (0, 4) and inputs.check_boxes([], "b").shape == (0, 4)
