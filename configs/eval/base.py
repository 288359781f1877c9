"""The shared shape of an eval config: which evaluator, which dataset reader, which splits, and where files live.

Every benchmark file (refcoco.py, grefcoco.py, ...) calls `eval_config`; its `arg` selects splits:

    python scripts/eval.py --config configs/eval/refcoco.py:val --config.predictions=FILE --config.data_dir=DIR
    python scripts/eval.py --config configs/eval/refcoco.py:val,testA ...

Box source (docs/evaluation.md "Boxes"): with a checkpoint, the model reads object and part boxes from
`proposals` (a section of configs/common.py `proposals_config`), attached when the split is prepared. The default
is `none` (no boxes: a number is never made with boxes nobody chose); `detections` reads a detector's COCO results
files, `sam` runs SAM's automatic mask generation. Ground-truth boxes (`annotations`) are refused unless
`allow_gt_boxes=True`, and then every metrics file says "ground-truth boxes".
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from configs import common


def select_splits(arg: str | None, splits: Sequence[str], benchmark: str) -> list[str]:
  """`arg` as a comma-separated list of splits (a leading ':' is allowed); all splits when empty."""
  arg = (arg or "").lstrip(":").strip()
  if not arg:
    return list(splits)
  chosen = [s.strip() for s in arg.split(",") if s.strip()]
  unknown = [s for s in chosen if s not in splits]
  if unknown:
    raise ValueError(f"eval config {benchmark}: unknown split(s) {unknown}; expected some of {list(splits)}")
  return chosen


def eval_config(*, evaluator: str, dataset: str, reader: str, splits: Sequence[str], arg: str | None = None,
                benchmark: str | None = None, **fields) -> ml_collections.ConfigDict:
  """One evaluation: the schema of every configs/eval/*.py file and of each entry of a training config's
  `evals[name]` (the trainer's evaluations are built from the same fields). `fields` override the defaults below;
  an unknown one is a KeyError."""
  c = ml_collections.ConfigDict()
  c.type = evaluator        # name in unires_jax.eval.evaluators.EVALUATORS: which metrics are reported
  c.dataset = dataset       # the `dataset` field every predictions line must carry
  c.reader = reader         # name in unires_jax.data.datasets.DATASETS: how the ground truth is read
  # Reader keyword options; empty values fall back to the reader's defaults (image_dir: <data_dir>/images).
  c.reader_options = ml_collections.ConfigDict({"image_dir": ""})
  c.splits = select_splits(arg, splits, benchmark or dataset)
  c.data_dir = ""           # the benchmark in its real layout
  c.proposals = common.proposals_config("none")  # the boxes the model reads (checkpoint mode, the trainer)
  c.allow_gt_boxes = False  # True: allow a ground-truth source (proposals.source='annotations'), labelled as such
  c.sentence_mode = "per_sentence"  # one sample per (ref, sentence); 'merged' is refused (docs/evaluation.md)
  c.batch_size = 8          # global eval batch size when the model runs
  c.allow_missing = False   # True: score missing samples as empty predictions instead of failing
  # scripts/eval.py only: what to score and where the reports go.
  c.predictions = ""        # predictions.jsonl to score (offline mode)
  c.output_dir = ""         # where metrics.json / metrics.md go; default: beside the predictions
  c.checkpoint = ""         # a model checkpoint to run instead of reading predictions (model-in-the-loop mode)
  # The trainer only (config.evals[name]; train.eval_every sets when evaluations happen besides the final one).
  c.heldout_loss = False    # True: the teacher-forced loss of each split at every evaluation
  c.generate_every_eval = False  # True: generation and metrics at every evaluation, not only the final one
  unknown = sorted(set(fields) - set(c.keys()))
  if unknown:
    raise KeyError(f"eval config {benchmark or dataset}: unknown key(s) {unknown}; expected some of {sorted(c.keys())}")
  for key, value in fields.items():
    c[key] = value
  return c
