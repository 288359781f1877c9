"""The Grain input pipeline: prepared splits → batches with exactly the keys, dtypes and shapes of docs/DESIGN.md.

Train: per split `MapDataset.range(samples).shuffle(seed).repeat()`, mixed by weight (`MapDataset.mix`), then
load + preprocess (a `random_map`, so template choice is deterministic per position), a per-process slice,
`to_iter_dataset`, `batch(drop_remainder=True)` and optional `mp_prefetch`. Eval: one split in table order, padded to
a whole number of global batches with rows marked `sample_index = -1`, so every process yields the same number of
batches. The choices (box selection, too-long samples, the answer span) are documented in docs/data_pipeline.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Sequence

import grain
from absl import flags
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unires_jax import sharding
from unires_jax.data import images as images_lib
from unires_jax.data import records as records_lib
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.data import transforms
from unires_jax.data import proposal_noise as noise_lib
# The JAX-free prompt and box helpers, re-exported: the pipeline's callers name them `pipeline.X`.
from unires_jax.data.prompts import (IMAGE_SLOT, OBJECT_SLOT, PART_SLOT, PROMPT_STYLES, TEXT, Layout,  # noqa: F401
                                     box_area, box_iou, canvas_boxes, granularity_boxes,
                                     llava_v1_prompt, prompt_ids, select_boxes,
                                     unires_prompt, visual_prefix)

log = logging.getLogger(__name__)

# data.box_source: the record's proposals (whatever made them), the ground-truth annotation boxes, or no boxes.
BOX_SOURCES = ("proposals", "annotations", "none")
TOO_LONG_POLICIES = ("error", "skip")
# Private per-sample counters; the last stage of the pipeline (in the main process) sums and removes them.
_COUNTER_KEYS = ("_dropped_object_boxes", "_dropped_part_boxes", "_too_long")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One prepared split (a directory written by `records.write_split`) and its mixture weight."""
  dir: str
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `config.data` section (configs/data_common.py documents every key)."""
  sources: tuple[SourceConfig, ...]
  batch_size: int
  max_text_len: int
  instruction_templates: tuple[str, ...]
  answer_templates: tuple[str, ...]
  no_target_answer_templates: tuple[str, ...]
  seed: int = 0
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 4
  read_buffer_size: int = 64
  box_source: str = "annotations"
  proposal_noise: noise_lib.NoiseConfig = dataclasses.field(default_factory=noise_lib.NoiseConfig)
  targets_first: bool = True
  too_long: str = "error"
  tokenizer_path: str = ""
  toy_tokenizer_prefix: str = ""
  toy_tokenizer_vocab_size: int = 512
  prompt_style: str = "unires"
  system_prompt: str = ""
  answer_decision_weight: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "sources", tuple(
        s if isinstance(s, SourceConfig) else SourceConfig(**dict(s)) for s in self.sources))
    for name in ("instruction_templates", "answer_templates", "no_target_answer_templates"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not isinstance(self.proposal_noise, noise_lib.NoiseConfig):
      object.__setattr__(self, "proposal_noise", noise_lib.NoiseConfig.from_dict(dict(self.proposal_noise)))
    if self.box_source not in BOX_SOURCES:
      raise ValueError(f"data.box_source {self.box_source!r}: expected one of {BOX_SOURCES}")
    if self.prompt_style not in PROMPT_STYLES:
      raise ValueError(f"data.prompt_style {self.prompt_style!r}: expected one of {sorted(PROMPT_STYLES)}")
    if self.too_long not in TOO_LONG_POLICIES:
      raise ValueError(f"data.too_long {self.too_long!r}: expected one of {TOO_LONG_POLICIES}")
    if not self.answer_decision_weight > 0:
      raise ValueError(f"data.answer_decision_weight must be > 0, got {self.answer_decision_weight!r}")
    if any(s.weight <= 0 for s in self.sources):
      raise ValueError(f"data.sources weights must be positive, got {[s.weight for s in self.sources]}")
    if not (self.instruction_templates and self.answer_templates and self.no_target_answer_templates):
      raise ValueError("data.instruction_templates, answer_templates and no_target_answer_templates must be "
                       "non-empty lists")
    for template in self.instruction_templates:
      if "{phrase}" not in template:
        raise ValueError(f"data.instruction_templates entry {template!r}: expected a '{{phrase}}' field")
    for template in self.answer_templates:
      if tokenizer_lib.SEG_TOKEN not in template:
        raise ValueError(f"data.answer_templates entry {template!r}: a targeted answer must contain "
                         f"{tokenizer_lib.SEG_TOKEN}")
    for template in self.no_target_answer_templates:
      if tokenizer_lib.SEG_TOKEN in template:
        raise ValueError(f"data.no_target_answer_templates entry {template!r}: a no-target answer must not "
                         f"contain {tokenizer_lib.SEG_TOKEN}")


@dataclasses.dataclass
class PipelineStats:
  """Counts since the iterator was made (not restored with its state): samples, dropped boxes, too-long skips."""
  samples: int = 0
  dropped_object_boxes: int = 0
  dropped_part_boxes: int = 0
  too_long_samples: int = 0


# ------------------------------------------------------------------------------------------------ the prompt


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


# ------------------------------------------------------------------------------------------------- boxes


def box_source_of(split_dir: str, data: DataConfig | ml_collections.ConfigDict) -> str:
  """What the object and part boxes of `split_dir`'s batches are, for metrics files: `records.GT_BOXES_SOURCE`
  (`data.box_source='annotations'`), `records.NO_BOXES_SOURCE` ('none'), or with 'proposals' the source the
  split's records name (index.json `proposals.sources`; several sources are listed with their image counts).
  Training noise is not part of it: it never touches evaluation batches."""
  box_source = data.box_source
  if box_source not in BOX_SOURCES:
    raise ValueError(f"data.box_source {box_source!r}: expected one of {BOX_SOURCES}")
  if box_source == "annotations":
    return records_lib.GT_BOXES_SOURCE
  if box_source == "none":
    return records_lib.NO_BOXES_SOURCE
  sources = records_lib.read_index(split_dir).get("proposals", {}).get("sources")
  if not sources:
    raise records_lib.RecordError(f"prepared split {split_dir}: {records_lib.INDEX} has no 'proposals.sources' "
                                  f"(prepared before records carried their proposal source); prepare it again")
  if len(sources) == 1:
    return next(iter(sources))
  return " + ".join(f"{source} on {count} images" for source, count in sorted(sources.items()))


def uses_ground_truth_boxes(box_source: str) -> bool:
  """Whether a `box_source_of` description involves ground-truth boxes (benchmark evaluation refuses those)."""
  return records_lib.GT_BOXES_SOURCE in box_source


# ------------------------------------------------------------------------------------------- one sample


decode_image = records_lib.decode_image  # re-exported: callers name it `pipeline.decode_image`


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
    text = encode_text(self.tokenizer, layout, instruction, answer,
                       data.answer_decision_weight if self.train else 1.0)
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


class _CountAndStrip:
  """Last stage, in the main process: adds the private counters to `stats` and removes them from the batch."""

  def __init__(self, stats: PipelineStats | None):
    self.stats = stats

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    counters = {k: batch.pop(k) for k in _COUNTER_KEYS}
    if self.stats is not None:
      self.stats.samples += int(counters["_too_long"].shape[0])
      self.stats.dropped_object_boxes += int(counters["_dropped_object_boxes"].sum())
      self.stats.dropped_part_boxes += int(counters["_dropped_part_boxes"].sum())
      self.stats.too_long_samples += int(counters["_too_long"].sum())
    if counters["_too_long"].any() or counters["_dropped_object_boxes"].any() or counters["_dropped_part_boxes"].any():
      log.debug("batch: %d too-long samples skipped, %d object / %d part boxes dropped",
                counters["_too_long"].sum(), counters["_dropped_object_boxes"].sum(),
                counters["_dropped_part_boxes"].sum())
    return batch


# ------------------------------------------------------------------------------------------------ iterators


class _Tag:
  """`sample_index → (split, sample_index)`; a class so the pipeline pickles into workers."""

  def __init__(self, split: int):
    self.split = split

  def __call__(self, sample_index) -> tuple[int, int]:
    return self.split, int(sample_index)


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} must lie in [0, process_count = {count})")
  return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"data.batch_size {global_batch_size} does not divide over {process_count} processes")
  return global_batch_size // process_count


def _finish(dataset: grain.MapDataset, data: DataConfig, local_batch_size: int, drop_remainder: bool,
            stats: PipelineStats | None) -> grain.DatasetIterator:
  read_options = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.read_buffer_size)
  batched = dataset.to_iter_dataset(read_options).batch(local_batch_size, drop_remainder=drop_remainder)
  if data.worker_count > 0:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are unparsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.worker_count, per_worker_buffer_size=data.worker_buffer_size))
  return iter(batched.map(_CountAndStrip(stats)))


def resolve_tokenizer(config: ml_collections.ConfigDict) -> str:
  """The tokenizer model path: `data.tokenizer_path`, else the toy tokenizer (trained once from the sources'
  sentences and the templates at `data.toy_tokenizer_prefix`, default `<first source>/toy_tokenizer`).
  Checks that its ids fit `model.llm.vocab_size`."""
  data = DataConfig(**config.data.to_dict())
  path = data.tokenizer_path
  if not path:
    if not data.sources:
      raise ValueError("data.tokenizer_path is empty and data.sources is empty: nothing to train the toy "
                       "tokenizer on")
    prefix = data.toy_tokenizer_prefix or os.path.join(data.sources[0].dir, "toy_tokenizer")
    path = prefix + ".model"
    if not os.path.exists(path):
      sentences = [t.replace("{phrase}", "") for t in
                   data.instruction_templates + data.answer_templates + data.no_target_answer_templates]
      sentences += ["USER: ASSISTANT:"]
      for source_config in data.sources:
        source = records_lib.SplitSource(source_config.dir)
        for record_index in range(source.num_records):
          for ref in source.record(record_index)["refs"]:
            sentences += [s["sent"] for s in ref["sentences"]]
      # Trained under a private name, then renamed: processes that race here all write the same model.
      temp_prefix = f"{prefix}.tmp-{os.getpid()}"
      tokenizer_lib.train_toy_tokenizer(sentences, temp_prefix, data.toy_tokenizer_vocab_size)
      os.replace(temp_prefix + ".model", path)
      os.replace(temp_prefix + ".vocab", prefix + ".vocab")
  tokenizer_lib.check_vocab_fits(tokenizer_lib.Tokenizer(path), int(config.model.llm.vocab_size))
  return path


def make_train_iterator(config: ml_collections.ConfigDict, process_index: int | None = None,
                        process_count: int | None = None,
                        stats: PipelineStats | None = None) -> grain.DatasetIterator:
  """Endless, shuffled, mixed training batches of this process (`data.batch_size / process_count` samples).

  The iterator is checkpointable (`get_state()` / `set_state()`); `stats` (optional) accumulates counts.
  """
  data = DataConfig(**config.data.to_dict())
  if not data.sources:
    raise ValueError("data.sources is empty: expected at least one prepared split directory")
  layout = Layout.from_config(config)
  index, count = _process_slice(process_index, process_count)
  encoder = SampleEncoder([s.dir for s in data.sources], resolve_tokenizer(config), data, layout, train=True)
  splits = []
  for k, source_config in enumerate(data.sources):
    num_samples = len(encoder.source(k))
    if num_samples == 0:
      raise ValueError(f"prepared split {source_config.dir} has no samples")
    splits.append(grain.MapDataset.range(num_samples).shuffle(seed=data.seed + k).repeat().map(_Tag(k)))
  mixed = splits[0] if len(splits) == 1 else grain.MapDataset.mix(splits, [s.weight for s in data.sources])
  dataset = mixed.random_map(encoder, seed=data.seed)[index::count]
  return _finish(dataset, data, _local_batch_size(data.batch_size, count), drop_remainder=True, stats=stats)


def make_eval_iterator(config: ml_collections.ConfigDict, split_dir: str, batch_size: int | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       stats: PipelineStats | None = None) -> grain.DatasetIterator:
  """One pass over `split_dir` in sample-table order; the tail is padded to whole global batches
  (`sample_index = -1`), so every process yields the same number of full batches."""
  data = DataConfig(**config.data.to_dict())
  layout = Layout.from_config(config)
  index, count = _process_slice(process_index, process_count)
  global_batch_size = data.batch_size if batch_size is None else int(batch_size)
  encoder = SampleEncoder([split_dir], resolve_tokenizer(config), data, layout, train=False)
  num_samples = len(encoder.source(0))
  padded = math.ceil(num_samples / global_batch_size) * global_batch_size
  rows = np.concatenate([np.arange(num_samples), np.full((padded - num_samples,), -1)])  # [padded]
  dataset = grain.MapDataset.source(rows).map(_Tag(0)).map(encoder)[index::count]
  return _finish(dataset, data, _local_batch_size(global_batch_size, count), drop_remainder=False, stats=stats)


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's batch → global arrays with the batch dimension sharded over ('data', 'fsdp')."""
  batch_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
  return {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
          for key, value in local_batch.items()}
