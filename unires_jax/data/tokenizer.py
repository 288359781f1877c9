"""SentencePiece tokenizer with UniRES++'s special tokens, and a tiny deterministic trainer for the toy run.

The special tokens (`<image> <obj> <part> [SEG]` and the span markers) are SentencePiece user-defined symbols in
a model trained here; a LLaMA `tokenizer.model` lacks them, so they are appended after its base vocabulary and
text is split on them before SentencePiece sees it. Either way `encode` maps each special token to one id.

A Hugging Face tokenizer folder may hold `added_tokens.json` beside `tokenizer.model` (LISA's: `<im_patch>` 32000,
`<im_start>` 32001, `<im_end>` 32002, `[SEG]` 32003). When it names any of the special tokens (LLaVA's
`<im_patch>` standing for `<image>`), the ids come from that file and only the tokens it names exist: asking for
another (`special_ids['<obj>']`) fails naming the file. Ids are never found by tokenising the token's text.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm

IMAGE_TOKEN = "<image>"
OBJECT_TOKEN = "<obj>"
PART_TOKEN = "<part>"
SEG_TOKEN = "[SEG]"
IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"
OBJECT_START, OBJECT_END = "<obj_start>", "<obj_end>"
PART_START, PART_END = "<part_start>", "<part_end>"
# The order is the order in which they are appended after a base vocabulary (so the ids are stable).
SPECIAL_TOKENS = (IMAGE_TOKEN, OBJECT_TOKEN, PART_TOKEN, SEG_TOKEN, IMAGE_START, IMAGE_END, OBJECT_START,
                  OBJECT_END, PART_START, PART_END)
ADDED_TOKENS_FILE = "added_tokens.json"
# Names other projects give our special tokens in their added_tokens.json.
ADDED_TOKEN_ALIASES = {"<im_patch>": IMAGE_TOKEN}


class _AddedTokenIds(dict):
  """special token → id from an added_tokens.json; a token the file lacks fails naming the file."""

  def __init__(self, ids, path):
    super().__init__(ids)
    self.path = path

  def __missing__(self, token):
    raise KeyError(f"special token {token!r} is not in {self.path!r} (it defines {sorted(self)}); this tokenizer "
                   f"cannot build a prompt that needs it")


def read_added_tokens(path: str) -> dict[str, int]:
  """{special token: id} of the SPECIAL_TOKENS (or their aliases) an added_tokens.json names; others ignored."""
  try:
    with open(path) as f:
      added = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path!r} is not valid JSON ({e}); expected {{token: id}}") from e
  if not isinstance(added, dict) or not all(isinstance(v, int) for v in added.values()):
    raise ValueError(f"{path!r}: expected a JSON object {{token: integer id}}")
  ids = {}
  for name, token_id in added.items():
    token = ADDED_TOKEN_ALIASES.get(name, name)
    if token in SPECIAL_TOKENS:
      ids[token] = int(token_id)
  return ids


class Tokenizer:
  """`encode`/`decode` text with one id per special token; `special_ids` maps each special token to its id."""

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.base_vocab_size = int(self._sp.get_piece_size())
    in_model = {token: self._sp.piece_to_id(token) for token in SPECIAL_TOKENS}
    in_model = {token: i for token, i in in_model.items() if not self._sp.is_unknown(i)}
    if in_model and len(in_model) != len(SPECIAL_TOKENS):
      missing = sorted(set(SPECIAL_TOKENS) - set(in_model))
      raise ValueError(f"SentencePiece model {model_path!r} defines some special tokens but not {missing}; "
                       f"expected all of {SPECIAL_TOKENS} or none")
    self.specials_in_model = bool(in_model)
    added_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), ADDED_TOKENS_FILE)
    added = read_added_tokens(added_path) if os.path.exists(added_path) and not in_model else {}
    self.added_tokens_path = added_path if added else None
    if self.specials_in_model:
      self.special_ids = dict(in_model)
    elif added:
      low = [t for t, i in added.items() if i < self.base_vocab_size]
      if low:
        raise ValueError(f"{added_path!r}: {low[0]!r} has id {added[low[0]]}, inside the SentencePiece vocabulary "
                         f"of {self.base_vocab_size} pieces; expected added ids >= {self.base_vocab_size}")
      self.special_ids = _AddedTokenIds(added, added_path)
    else:
      self.special_ids = {token: self.base_vocab_size + k for k, token in enumerate(SPECIAL_TOKENS)}
    self._special_by_id = {i: token for token, i in self.special_ids.items()}
    present = [t for t in SPECIAL_TOKENS if t in self.special_ids]
    self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in present) + ")")

  @property
  def vocab_size(self) -> int:
    if self.specials_in_model:
      return self.base_vocab_size
    return max(self.base_vocab_size, max(self._special_by_id) + 1)

  @property
  def bos_id(self) -> int:
    return int(self._sp.bos_id())

  @property
  def eos_id(self) -> int:
    return int(self._sp.eos_id())

  @property
  def pad_id(self) -> int:
    """The model's pad id, else its unk id (a LLaMA model has no pad piece; padded positions are masked anyway)."""
    pad = int(self._sp.pad_id())
    return pad if pad >= 0 else int(self._sp.unk_id())

  def encode(self, text: str) -> list[int]:
    """Text → ids, without BOS/EOS; each special token in the text becomes its single id."""
    if self.specials_in_model:
      return list(self._sp.encode(text))
    ids: list[int] = []
    for chunk in self._special_pattern.split(text):
      if chunk in self.special_ids:
        ids.append(self.special_ids[chunk])
      elif chunk.strip():
        ids.extend(self._sp.encode(chunk))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Ids → text, special tokens rendered by name; BOS/EOS/pad are dropped."""
    ids = [int(i) for i in ids]
    if any(i < 0 or i >= self.vocab_size for i in ids):
      bad = [i for i in ids if i < 0 or i >= self.vocab_size]
      raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
    dropped = {self.bos_id, self.eos_id, self.pad_id}
    ids = [i for i in ids if i not in dropped]
    if self.specials_in_model:
      return self._sp.decode(ids)
    parts: list[str] = []
    run: list[int] = []
    for i in ids + [None]:
      if i is not None and i not in self._special_by_id:
        run.append(i)
        continue
      if run:
        text = self._sp.decode(run)
        # SentencePiece drops the word-boundary space at the start of a decoded run; keep it between segments.
        if parts and self._sp.id_to_piece(run[0]).startswith("\u2581"):
          text = " " + text
        parts.append(text)
        run = []
      if i is not None:
        parts.append((" " if parts else "") + self._special_by_id[i])
    return "".join(parts)


def check_vocab_fits(tokenizer: Tokenizer, llm_vocab_size: int) -> None:
  """Raises if the tokenizer's ids (special tokens included) do not fit the LLM's embedding table."""
  if tokenizer.vocab_size > llm_vocab_size:
    raise ValueError(f"tokenizer {tokenizer.model_path!r} has {tokenizer.vocab_size} ids (special tokens "
                     f"included) but model.llm.vocab_size is {llm_vocab_size}; expected vocab_size <= "
                     f"model.llm.vocab_size")


def train_toy_tokenizer(sentences: Iterable[str], out_prefix: str, vocab_size: int) -> str:
  """Trains a small BPE SentencePiece model with the special tokens as user-defined symbols; returns its path.

  Deterministic for the same sentences (one thread, no input sampling). Byte fallback keeps any text encodable,
  so `vocab_size` must leave room for the 256 byte pieces, `<unk> <s> </s>` and the special tokens.
  """
  sentences = [s for s in sentences if s.strip()]
  if not sentences:
    raise ValueError("train_toy_tokenizer needs at least one non-empty sentence")
  reserved = 256 + 3 + len(SPECIAL_TOKENS)
  if vocab_size <= reserved:
    raise ValueError(f"toy tokenizer vocab_size {vocab_size} must exceed the {reserved} reserved pieces "
                     f"(256 bytes, <unk> <s> </s>, {len(SPECIAL_TOKENS)} special tokens)")
  directory = os.path.dirname(out_prefix)
  if directory:
    os.makedirs(directory, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=out_prefix, vocab_size=vocab_size, model_type="bpe",
      user_defined_symbols=list(SPECIAL_TOKENS), byte_fallback=True, character_coverage=1.0,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, input_sentence_size=0,
      shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2)
  return out_prefix + ".model"
