"""The Grain input pipeline: prepared splits → batches with exactly the keys, dtypes and shapes of docs/DESIGN.md.

Train: per split `MapDataset.range(samples).shuffle(seed).repeat()`, mixed by weight (`MapDataset.mix`), then
load + preprocess (a `random_map`, so template choice is deterministic per position), a per-process slice,
`to_iter_dataset`, `batch(drop_remainder=True)` and optional `mp_prefetch`. Eval: one split in table order, padded to
a whole number of global batches with rows marked `sample_index = -1`, so every process yields the same number of
batches. The choices (box selection, too-long samples, the answer span) are documented in docs/data_pipeline.md;
`sample_encoder.py` turns one sample into a batch element, `data_config.py` holds `DataConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import grain
from absl import flags
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unires_jax import sharding
from unires_jax.data import records as records_lib
from unires_jax.data import tokenizer as tokenizer_lib
# Re-exported: the pipeline's callers name the config, box, encoder and JAX-free prompt helpers `pipeline.X`.
from unires_jax.data.box_sources import BOX_SOURCES, box_source_of, uses_ground_truth_boxes  # noqa: F401
from unires_jax.data.data_config import TOO_LONG_POLICIES, DataConfig, SourceConfig  # noqa: F401
from unires_jax.data.prompts import (IMAGE_SLOT, OBJECT_SLOT, PART_SLOT, PROMPT_STYLES, TEXT, Layout,  # noqa: F401
                                     box_area, box_iou, canvas_boxes, granularity_boxes,
                                     llava_v1_prompt, prompt_ids, select_boxes,
                                     unires_prompt, visual_prefix)
from unires_jax.data.sample_encoder import (_COUNTER_KEYS, SampleEncoder, decode_image, encode_text,  # noqa: F401
                                            inert_text)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineStats:
  """Counts since the iterator was made (not restored with its state): samples, dropped boxes, too-long skips."""
  samples: int = 0
  dropped_object_boxes: int = 0
  dropped_part_boxes: int = 0
  too_long_samples: int = 0


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


def tokenizer_model_path(config: ml_collections.ConfigDict) -> str:
  """Where a run's tokenizer model file is: `data.tokenizer_path`, else the toy tokenizer's
  (`<data.toy_tokenizer_prefix>.model`, default `<first source>/toy_tokenizer.model`). Checks nothing on disk."""
  data = config.data
  if data.get("tokenizer_path", ""):
    return data.tokenizer_path
  return _toy_tokenizer_prefix(DataConfig(**data.to_dict())) + ".model"


def _toy_tokenizer_prefix(data: DataConfig) -> str:
  """Where the toy tokenizer lives (without `.model`): `data.toy_tokenizer_prefix`, default
  `<first source>/toy_tokenizer`."""
  if not data.sources:
    raise ValueError("data.tokenizer_path is empty and data.sources is empty: nothing to train the toy "
                     "tokenizer on")
  return data.toy_tokenizer_prefix or os.path.join(data.sources[0].dir, "toy_tokenizer")


def ensure_toy_tokenizer(config: ml_collections.ConfigDict) -> str:
  """Trains the toy tokenizer from the sources' sentences and the templates unless it exists (or the config names
  `data.tokenizer_path`); returns the tokenizer model path. Where a run starts, before any pipeline is made."""
  data = DataConfig(**config.data.to_dict())
  if data.tokenizer_path:
    return data.tokenizer_path
  prefix = _toy_tokenizer_prefix(data)
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
  return path


def resolve_tokenizer(config: ml_collections.ConfigDict) -> str:
  """The tokenizer model path: `data.tokenizer_path`, else the toy tokenizer's (`ensure_toy_tokenizer` makes it).
  Creates nothing: a missing file is a FileNotFoundError naming it. Checks that its ids fit `model.llm.vocab_size`."""
  data = DataConfig(**config.data.to_dict())
  path = tokenizer_model_path(config)
  if not os.path.exists(path):
    how = ("data.tokenizer_path names no file" if data.tokenizer_path else
           "the toy tokenizer is made where a run starts (scripts/train.py, or "
           "unires_jax.data.pipeline.ensure_toy_tokenizer(config) before building a pipeline)")
    raise FileNotFoundError(f"tokenizer {path!r} not found: {how}")
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
