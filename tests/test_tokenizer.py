from __future__ import annotations

import pytest
import sentencepiece as spm

from unires_jax.data import tokenizer as tokenizer_lib

CAPTIONS = ["the left wheel of the red truck", "a man holding an umbrella", "two dogs on the grass",
            "the head of the cat", "Please segment the object in the image.", "Sure, it is [SEG]."] * 10


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
  return tokenizer_lib.train_toy_tokenizer(CAPTIONS, str(tmp_path_factory.mktemp("tok") / "toy"), 320)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  """A LLaMA-like model: no special tokens among its pieces, no pad piece."""
  prefix = str(tmp_path_factory.mktemp("base") / "base")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_prefix=prefix, vocab_size=290,
                                 model_type="bpe", byte_fallback=True, num_threads=1, pad_id=-1, minloglevel=2,
                                 hard_vocab_limit=False)
  return prefix + ".model"


def test_toy_tokenizer_holds_special_tokens_as_symbols(toy_model):
  tok = tokenizer_lib.Tokenizer(toy_model)
  assert tok.specials_in_model
  assert tok.vocab_size == 320
  assert sorted(tok.special_ids) == sorted(tokenizer_lib.SPECIAL_TOKENS)
  assert len(set(tok.special_ids.values())) == len(tokenizer_lib.SPECIAL_TOKENS)
  assert all(0 <= i < tok.vocab_size for i in tok.special_ids.values())
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  for token, token_id in tok.special_ids.items():
    assert token_id in tok.encode(token) and tok.encode(token).count(token_id) == 1
    assert tok.decode([token_id]) == token


def test_toy_round_trip_with_special_tokens(toy_model):
  tok = tokenizer_lib.Tokenizer(toy_model)
  text = "USER: <im_start><image><image><im_end> the left wheel ASSISTANT: Sure, it is [SEG]."
  ids = tok.encode(text)
  assert ids.count(tok.special_ids["<image>"]) == 2
  assert ids.count(tok.special_ids["[SEG]"]) == 1
  assert tok.decode(ids) == text
  # Text outside the training captions still encodes (byte fallback) and decodes back.
  assert tok.decode(tok.encode("Zebra ünïcode 42")) == "Zebra ünïcode 42"
  assert tok.decode([tok.bos_id] + tok.encode("the cat") + [tok.eos_id, tok.pad_id]) == "the cat"


def test_toy_training_is_deterministic(tmp_path):
  first = tokenizer_lib.train_toy_tokenizer(CAPTIONS, str(tmp_path / "a"), 300)
  second = tokenizer_lib.train_toy_tokenizer(CAPTIONS, str(tmp_path / "b"), 300)
  pieces = [[sp.id_to_piece(i) for i in range(sp.get_piece_size())]
            for sp in (spm.SentencePieceProcessor(model_file=path) for path in (first, second))]
  assert pieces[0] == pieces[1]
  assert len(pieces[0]) == 300


def test_toy_training_rejects_a_vocab_without_room(tmp_path):
  with pytest.raises(ValueError, match="reserved"):
    tokenizer_lib.train_toy_tokenizer(CAPTIONS, str(tmp_path / "small"), 200)


def test_special_tokens_are_appended_after_a_base_vocab(base_model):
  tok = tokenizer_lib.Tokenizer(base_model)
  raw = spm.SentencePieceProcessor(model_file=base_model)
  base = raw.get_piece_size()
  assert not tok.specials_in_model
  assert tok.vocab_size == base + len(tokenizer_lib.SPECIAL_TOKENS)
  assert [tok.special_ids[t] for t in tokenizer_lib.SPECIAL_TOKENS] == list(range(base, tok.vocab_size))
  assert tok.pad_id == raw.unk_id()
  # Plain text encodes exactly as the base model does; special tokens split it into independent runs.
  assert tok.encode("the red truck") == raw.encode("the red truck")
  ids = tok.encode("the cat [SEG] the dog")
  assert ids == raw.encode("the cat") + [tok.special_ids["[SEG]"]] + raw.encode("the dog")
  assert tok.decode(ids) == "the cat [SEG] the dog"
  assert tok.decode(tok.encode("<obj_start> <obj> <obj_end>")) == "<obj_start> <obj> <obj_end>"


def test_decode_rejects_ids_outside_the_vocab(base_model):
  tok = tokenizer_lib.Tokenizer(base_model)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_check_vocab_fits_names_both_sizes(toy_model):
  tok = tokenizer_lib.Tokenizer(toy_model)
  tokenizer_lib.check_vocab_fits(tok, 320)
  with pytest.raises(ValueError, match="320 ids.*vocab_size is 256"):
    tokenizer_lib.check_vocab_fits(tok, 256)


def test_missing_model_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.model"):
    tokenizer_lib.Tokenizer(str(tmp_path / "nowhere.model"))


def test_special_ids_come_from_the_vocabulary_not_from_tokenising(toy_model):
  tok = tokenizer_lib.Tokenizer(toy_model)
  raw = spm.SentencePieceProcessor(model_file=toy_model)
  for token in tokenizer_lib.SPECIAL_TOKENS:
    assert tok.special_id(token) == raw.piece_to_id(token) == tok.special_ids[token]
    assert raw.id_to_piece(tok.special_id(token)) == token
  # Tokenising the bare string may add a word-boundary piece in front (LISA issue #55); the lookup never does.
  seg = tok.special_id("[SEG]")
  assert raw.encode("[SEG]")[-1] == seg and tok.encode("It is [SEG].").count(seg) == 1
  with pytest.raises(ValueError, match=r"'<mask>' is not a special token .*expected one of"):
    tok.special_id("<mask>")


def _with_ids(path, **ids):
  tok = tokenizer_lib.Tokenizer(path)
  tok.special_ids = dict(tok.special_ids, **ids)
  return tok


def test_each_special_token_must_be_one_id_of_its_own(toy_model, base_model):
  # Appended ids (a LLaMA-like model): no two tokens share one, none takes BOS/EOS/pad, all fit the vocab.
  base = tokenizer_lib.Tokenizer(base_model)
  with pytest.raises(ValueError, match=r"special tokens share ids \{\d+: \['<obj>', '<part>'\]\}"):
    _with_ids(base_model, **{"<part>": base.special_ids["<obj>"]})._check_special_ids()
  with pytest.raises(ValueError, match=r"take the ids of \{'EOS': \['\[SEG\]'\]\}"):
    _with_ids(base_model, **{"[SEG]": base.eos_id})._check_special_ids()
  with pytest.raises(ValueError, match=r"'\[SEG\]' resolves to \d+, expected one id in \[0, \d+\)"):
    _with_ids(base_model, **{"[SEG]": base.vocab_size})._check_special_ids()
  # In the model: the id's piece must be the token itself.
  toy = tokenizer_lib.Tokenizer(toy_model)
  for other in (toy.special_ids["<obj>"], toy.eos_id):
    with pytest.raises(ValueError, match=r"'\[SEG\]' resolves to id \d+, whose piece is '(<obj>|</s>)'"):
      _with_ids(toy_model, **{"[SEG]": other})._check_special_ids()


def test_added_tokens_json_ids_are_checked_to_be_one_each(base_model, tmp_path):
  import json
  import shutil

  shutil.copy(base_model, tmp_path / "tokenizer.model")
  base = spm.SentencePieceProcessor(model_file=base_model).get_piece_size()
  added = {"<im_patch>": base, "<im_start>": base + 1, "<im_end>": base + 2, "[SEG]": base + 3}
  (tmp_path / "added_tokens.json").write_text(json.dumps(added))
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "tokenizer.model"))
  assert tok.special_id("[SEG]") == base + 3 and tok.special_id("<image>") == base
  (tmp_path / "added_tokens.json").write_text(json.dumps(dict(added, **{"[SEG]": base + 2})))
  with pytest.raises(ValueError, match=r"added_tokens.json': special tokens share ids \{\d+: \['<im_end>', "
                                       r"'\[SEG\]'\]\}"):
    tokenizer_lib.Tokenizer(str(tmp_path / "tokenizer.model"))
