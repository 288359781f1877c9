"""The model card (`README.md`) of an export: what the weights are and where they came from, without JAX.

From the run's config (as saved in its `config.json`), the step and source checkpoint, and the eval results the run
wrote for that step (`<workdir>/eval/step_<N>/<set>/metrics.json`): the model section, every training split with its
mixture weight (and its dataset/split/sample count when the prepared split's `index.json` is readable), the steps,
and one table row per evaluated split with the metrics the evaluator headlines.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

CARD_FILE = "README.md"


def _split_description(directory: str) -> str:
  index = os.path.join(directory, "index.json")
  if not os.path.exists(index):
    return "(prepared split not found here)"
  try:
    with open(index) as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError):
    return "(index.json unreadable)"
  parts = [f"{key} {info[key]}" for key in ("dataset", "split") if key in info]
  samples = info.get("num_samples", info.get("samples"))
  if samples is not None:
    parts.append(f"{samples} samples")
  return ", ".join(parts) or "(index.json names no dataset)"


def eval_results(workdir: str | None, step: int | None) -> dict[str, dict[str, Any]]:
  """{'<set>/<split>': metrics} of `<workdir>/eval/step_<step>/*/metrics.json` (empty when there are none)."""
  if not workdir or step is None:
    return {}
  results = {}
  for path in sorted(glob.glob(os.path.join(workdir, "eval", f"step_{step}", "*", "metrics.json"))):
    with open(path) as f:
      report = json.load(f)
    for split, entry in sorted(report.get("splits", {}).items()):
      results[f"{os.path.basename(os.path.dirname(path))}/{split}"] = entry.get("metrics", {})
  return results


def _format(value: Any) -> str:
  return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def model_card(config: Mapping[str, Any], source: str, step: int | None, workdir: str | None,
               export: Mapping[str, Any]) -> str:
  """The card's markdown. `config` is the run config as a plain dict; `export` the export summary."""
  train = config.get("train", {})
  lines = ["# UniRES export", "",
           f"Source checkpoint: `{source}`" + (f", step {step}" if step is not None else "") + ".",
           f"Trained for {step if step is not None else 'an unknown number of'} of "
           f"{train.get('total_steps', '?')} configured steps.",
           f"Weights: {export.get('dtype', 'float32')}, LoRA {export.get('lora', 'none')}.", "",
           "## Training data", ""]
  sources = config.get("data", {}).get("sources", [])
  if sources:
    lines += ["| split | weight | what |", "|---|---|---|"]
    lines += [f"| `{s['dir']}` | {s.get('weight', 1.0)} | {_split_description(s['dir'])} |" for s in sources]
  else:
    lines.append("The run config names no training split (an import, not a training run).")
  lines += ["", "## Evaluation", ""]
  results = eval_results(workdir, step)
  if results:
    names = sorted({name for metrics in results.values() for name in metrics})
    lines += ["| set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(_format(metrics.get(n)) for n in names) + " |"
              for key, metrics in results.items()]
    lines += ["", f"From `{workdir}/eval/step_{step}/*/metrics.json` (the run's own evaluation at this step)."]
  else:
    lines.append(f"No evaluation results for this step (no `eval/step_{step}/*/metrics.json` in the run).")
  lines += ["", "## Model config", "", "```json", json.dumps(config.get("model", {}), indent=2), "```", ""]
  return "\n".join(lines)
