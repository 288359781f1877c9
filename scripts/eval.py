"""Scores a benchmark: a predictions.jsonl file against the ground truth in its real layout (no model needed).

    python scripts/eval.py --config configs/eval/refcoco.py:val --config.predictions=FILE --config.data_dir=DIR

Writes metrics.json and metrics.md to `--config.output_dir` (default: beside the predictions) and prints the
table, which starts with how the numbers were made (box source, sentence mode, IoU resolution, checkpoint, step).
With `--config.checkpoint=DIR` the model-in-the-loop mode first writes the predictions file from a checkpoint
(`unires_jax.eval.checkpoint_eval.write_predictions`), with boxes from `--config.proposals.source=...` (default `none`;
ground-truth boxes need `--config.allow_gt_boxes=True`), then scores it the same way. Known errors print one line
and exit with status 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unires_jax import cli  # noqa: E402
from unires_jax.eval import scoring  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "eval config: configs/eval/<benchmark>.py[:splits]",
                                          lock_config=True)


def _with(config, **overrides):
  """A copy of `config` with `overrides` set; the caller's config is left as it was."""
  copy = config.copy_and_resolve_references()
  with copy.unlocked():
    for key, value in overrides.items():
      setattr(copy, key, value)
  return copy


def evaluate(config) -> dict:
  """Scores `config.predictions`, or the predictions of `config.checkpoint` when one is given (they are written
  under the checkpoint's eval folder, or `config.output_dir`, and scored there)."""
  if config.checkpoint:
    from unires_jax.eval import checkpoint_eval

    written = checkpoint_eval.write_predictions(config)
    config = _with(config, predictions=written.predictions, output_dir=written.output_dir)
  report = scoring.score_from_config(config)
  report["output_dir"] = config.output_dir or os.path.dirname(os.path.abspath(config.predictions))
  return report


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    report = evaluate(_CONFIG.value)
  except (FileNotFoundError, ValueError, KeyError) as error:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"eval.py: error: {message}", file=sys.stderr)
    sys.exit(2)
  output_dir = report["output_dir"]
  logging.info("wrote %s and %s", os.path.join(output_dir, "metrics.json"), os.path.join(output_dir, "metrics.md"))
  print(report["table"])


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run_main(main, "eval.py", absl_app=True)
