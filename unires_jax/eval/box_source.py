"""Which object and part boxes benchmark evaluation hands the model, and the prepared splits that carry them.

Benchmark evaluation (`scripts/eval.py --config.checkpoint`, the trainer's final evaluation) reads its boxes from a
proposal source (`unires_jax.proposals`) attached to the records when a split is prepared, and the pipeline is told
to read exactly those (`data.box_source = 'proposals'`), whatever the run trained with (usually `annotations`). A source
that reads annotations (`is_ground_truth`) is refused unless `allow_gt_boxes=True`; the result then says
"ground-truth boxes" (`provenance.MadeWith`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterable

import ml_collections

from unires_jax import proposals as proposals_lib
from unires_jax.data import pipeline
from unires_jax.data import records as records_lib
from unires_jax.eval import provenance

log = logging.getLogger(__name__)

STAMP = "prepared_from.json"


def check_policy(proposals_config: ml_collections.ConfigDict, allow_gt_boxes: bool, where: str) -> None:
  """The refusal of `eval_source`, from the registered class alone (nothing is built or loaded)."""
  source_class = proposals_lib.SOURCES.lookup(proposals_config.source)
  if getattr(source_class, "is_ground_truth", False) and not allow_gt_boxes:
    raise provenance.GroundTruthBoxesError(provenance.ground_truth_refusal(where, proposals_config.source))


def eval_source(proposals_config: ml_collections.ConfigDict, allow_gt_boxes: bool,
                where: str) -> proposals_lib.ProposalSource:
  """The source `proposals_config` names, refused when it reads annotations and `allow_gt_boxes` is False."""
  source = proposals_lib.build_source(proposals_config)
  if source.is_ground_truth and not allow_gt_boxes:
    raise provenance.GroundTruthBoxesError(provenance.ground_truth_refusal(where, source.describe()))
  if source.is_ground_truth:
    log.warning("%s: evaluating with ground-truth boxes (%s); the results say so", where, source.describe())
  return source


def made_with(source: proposals_lib.ProposalSource, sentence_mode: str, checkpoint: str,
              step: int | None) -> provenance.MadeWith:
  return provenance.MadeWith(box_source=source.describe(), ground_truth_boxes=bool(source.is_ground_truth),
                             sentence_mode=provenance.check_sentence_mode(sentence_mode),
                             checkpoint=checkpoint, step=step)


def eval_run_config(run_config: ml_collections.ConfigDict, batch_size: int | None = None
                    ) -> ml_collections.ConfigDict:
  """A copy of a run config whose pipeline reads the records' attached proposals and nothing else."""
  copy = ml_collections.ConfigDict(run_config.to_dict())
  copy.data.box_source = "proposals"
  if batch_size is not None:
    copy.data.batch_size = int(batch_size)
  return copy


# ------------------------------------------------------------------------------------ prepared splits


def source_stamp(source: proposals_lib.ProposalSource, proposals_config: ml_collections.ConfigDict) -> dict:
  return {"source": source.describe(), "proposals": proposals_config.to_dict()}


def _stamp_matches(out_dir: str, stamp: dict) -> bool:
  path = os.path.join(out_dir, STAMP)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f) == json.loads(json.dumps(stamp))


def prepare_split(records_fn: Callable[[], Iterable[dict]], source: proposals_lib.ProposalSource, out_dir: str,
                  stamp: dict[str, Any], *, dataset: str, split: str,
                  decode: Callable[[dict], Any] = pipeline.decode_image) -> str:
  """`out_dir` holding `records_fn()`'s records with the source's proposals; reused while its stamp (what it was
  made from: reader or split, and the source) is unchanged. On several processes, process 0 writes, the others
  wait for it."""
  import jax

  if jax.process_index() == 0 and not _stamp_matches(out_dir, stamp):
    records_lib.write_split(proposals_lib.attach(records_fn(), source, decode), out_dir, num_shards=1,
                            dataset=dataset, split=split)
    temp = os.path.join(out_dir, f"{STAMP}.tmp-{os.getpid()}")
    with open(temp, "w") as f:
      json.dump(stamp, f, indent=2)
    os.replace(temp, os.path.join(out_dir, STAMP))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"unires_jax proposals attached to {out_dir}")
  return out_dir


def prepare_benchmark_splits(eval_config: ml_collections.ConfigDict, cache_dir: str,
                             source: proposals_lib.ProposalSource) -> dict[str, str]:
  """{split: prepared split dir} for an eval config (configs/eval/base.py): each of `splits` read from `data_dir`
  through `reader`, the source's proposals attached, written as records under `cache_dir/<split>`; a split already
  prepared from the same reader, data_dir, options and source is reused."""
  from unires_jax.data import datasets

  read = datasets.DATASETS.lookup(eval_config.reader)
  options = {k: v for k, v in eval_config.reader_options.to_dict().items() if v not in ("", None)}
  stamp = {"reader": eval_config.reader, "data_dir": os.path.abspath(eval_config.data_dir), "options": options,
           **source_stamp(source, eval_config.proposals)}
  return {split: prepare_split(lambda split=split: read(eval_config.data_dir, split, **options), source,
                               os.path.join(cache_dir, split), stamp, dataset=eval_config.dataset, split=split)
          for split in eval_config.splits}
