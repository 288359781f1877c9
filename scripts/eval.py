"""Scores a benchmark: a predictions.jsonl file against the ground truth in its real layout (no model needed).

    python scripts/eval.py --config configs/eval/refcoco.py:val --config.predictions=FILE --config.data_dir=DIR

Writes metrics.json and metrics.md to `--config.output_dir` (default: beside the predictions) and prints the
table. With `--config.checkpoint=DIR` the model-in-the-loop mode first writes the predictions file from a
checkpoint (`unires_jax.eval.inference.write_predictions(config) -> path`), then scores it the same way.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unires_jax.eval import scoring  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "eval config: configs/eval/<benchmark>.py[:splits]",
                                          lock_config=True)


def predictions_from_checkpoint(config) -> str:
  """Model-in-the-loop mode: runs the checkpoint over the benchmark and returns the predictions file it wrote."""
  from unires_jax.eval import inference

  return inference.write_predictions(config)


def evaluate(config) -> dict:
  """Scores `config.predictions`, or the predictions of `config.checkpoint` when one is given."""
  if config.checkpoint:
    predictions = predictions_from_checkpoint(config)
    with config.unlocked():
      config.predictions = predictions
  return scoring.score_from_config(config)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  report = evaluate(config)
  output_dir = config.output_dir or os.path.dirname(os.path.abspath(config.predictions))
  logging.info("wrote %s and %s", os.path.join(output_dir, "metrics.json"), os.path.join(output_dir, "metrics.md"))
  print(report["table"])


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
