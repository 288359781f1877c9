"""The `config.data` section the input pipeline (unires_jax/data/pipeline.py) reads, for the toy and full runs.

Keys:
  sources: list of {dir, weight}: prepared split directories (records.write_split) mixed by weight in training.
  batch_size: global batch size (over all processes); each process yields batch_size / process_count.
  max_text_len: L, the static token length: the visual prefix (2 + 1 + (S_l/patch)^2 + No + Np + 6 markers) plus
    the question and answer. At most model.llm.max_seq_len.
  instruction_templates: user turns with a '{phrase}' field; training picks one per sample, eval the first.
  answer_templates: targeted answers, each containing [SEG]; no_target_answer_templates: answers without [SEG].
  seed: shuffle / template-choice seed. worker_count: grain worker processes (0 = in the main process).
  worker_buffer_size: batches each worker keeps ready. read_threads, read_buffer_size: grain ReadOptions of the
    map stage. The shuffle is a global permutation of sample indices per epoch (grain MapDataset.shuffle), so it
    needs no shuffle buffer.
  box_source: where the object and part boxes come from: 'annotations' (the record's ground-truth boxes; the
    default, for training), 'proposals' (the record's `proposals`, whatever source made them: detection files,
    `sam`, ...; what benchmark evaluation uses) or 'none' (no boxes; every slot masked).
    `pipeline.box_source_of(split_dir, data)` says which boxes a split's batches carry, for metrics files.
  proposal_noise: training-only box noise (unires_jax/data/proposal_noise.py): enabled (False), jitter (centre shift
    and size change as a fraction of the box's size), drop_target_prob / drop_other_prob (chance that a referred
    target's / any other box is removed), false_positives (mean number of spurious boxes added per image and
    granularity, Poisson), shifted_copy_prob (share of those that are copies of a real box moved by 0.5-1 of its
    size; the rest are random boxes with sides false_positive_size = (min, max) fractions of the image's),
    shuffle (permute the boxes' order), seed (mixed with each sample's generator). Evaluation never sees it.
  targets_first: in training, when an image has more boxes than the model's slots, keep the referred targets'
    boxes first (then larger area first); eval never looks at the targets.
  too_long: 'error' (default: a sample whose prompt + answer exceed max_text_len stops the run, naming it) or
    'skip' (it becomes an inert, counted sample: no loss, no mask, sample_index -1).
  tokenizer_path: a SentencePiece model (LLaMA tokenizer.model for the full run); empty: the toy tokenizer,
    trained once where a run starts (pipeline.ensure_toy_tokenizer) from the sources' sentences at
    toy_tokenizer_prefix (empty: <first source>/toy_tokenizer) with toy_tokenizer_vocab_size pieces.
  prompt_style: 'unires' (the visual prefix of image, object and part slots, then `USER: ... ASSISTANT:`) or
    'llava_v1' (LISA's `<s>{system_prompt} USER: <im_start><image>×Ni<im_end>\n... ASSISTANT:`, image slots only).
  system_prompt: the llava_v1 system text (unused by 'unires').
  answer_decision_weight: training loss weight of the position that predicts the answer's first token, the one
    that says target or no target (1: every answer token alike; the mean is taken over the weights).
  no_target_decision_scale: that weight is multiplied by this for no-target answers (1: both kinds alike; above 1
    shifts the decision towards "no target" when no-target phrases are the rarer kind).
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

RUNS = ("toy", "full")

INSTRUCTION_TEMPLATES = (
    "Can you segment {phrase} in this image?",
    "Please segment {phrase} in this image.",
    "What is {phrase} in this image? Please respond with a segmentation mask.",
)
ANSWER_TEMPLATES = ("Sure, it is [SEG].", "It is [SEG].", "Sure, the segmentation result is [SEG].")
NO_TARGET_ANSWER_TEMPLATES = ("Sorry, there is no such target in this image.",
                              "There is no {phrase} in this image.")


def data_config(run: str = "toy", sources: Sequence[tuple[str, float] | str] = ()) -> ml_collections.ConfigDict:
  """The data section; `sources` are split directories or (directory, weight) pairs."""
  if run not in RUNS:
    raise ValueError(f"unknown data run {run!r}; expected one of {RUNS}")
  source_list = []
  for source in sources:
    directory, weight = (source, 1.0) if isinstance(source, str) else source
    source_list.append(dict(dir=str(directory), weight=float(weight)))
  toy = run == "toy"
  return ml_collections.ConfigDict(dict(
      sources=tuple(source_list),  # a tuple, so `--config.data.sources=...` can override it
      batch_size=8 if toy else 32,
      # toy: 1 + 18 + 6 + 10 = 35 prefix tokens (tiny model); full: 1 + 578 + 34 + 66 = 679 (7b model).
      max_text_len=96 if toy else 768,
      instruction_templates=list(INSTRUCTION_TEMPLATES),
      answer_templates=list(ANSWER_TEMPLATES),
      no_target_answer_templates=list(NO_TARGET_ANSWER_TEMPLATES),
      seed=0,
      worker_count=0 if toy else 8,
      worker_buffer_size=2,
      read_threads=2 if toy else 8,
      read_buffer_size=16 if toy else 128,
      box_source="annotations",
      proposal_noise=dict(enabled=False, jitter=0.1, drop_target_prob=0.1, drop_other_prob=0.2, false_positives=1.0,
                          shifted_copy_prob=0.5, false_positive_size=(0.05, 0.5), shuffle=True, seed=0),
      targets_first=True,
      too_long="error",
      tokenizer_path="",
      toy_tokenizer_prefix="",
      toy_tokenizer_vocab_size=512,
      prompt_style="unires",  # or "llava_v1" (LISA: system text, image group only; configs/lisa.py)
      system_prompt="",
      answer_decision_weight=1.0,
      no_target_decision_scale=1.0,
  ))
