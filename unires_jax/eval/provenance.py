"""How a result was made: box source, sentence mode, IoU resolution, checkpoint and step (`MadeWith`).

Every results file carries it: metrics.json (`made_with`), metrics.md (a header, and a warning line when the model
read ground-truth boxes) and a sidecar beside each predictions file (`<name>.meta.json`, since predictions lines
hold predictions only), which offline scoring reads back so a re-scored file still says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# One sample per (ref, sentence) is the benchmarks' protocol; no other mode is implemented (docs/evaluation.md).
SENTENCE_MODES = {"per_sentence": "one sample per sentence"}
IOU_RESOLUTION = "original"
UNKNOWN = "unknown"
GROUND_TRUTH_DETAIL = ("the model read the annotated object and part boxes (allow_gt_boxes=True); these numbers "
                       "are not comparable with published ones")
GROUND_TRUTH_WARNING = f"ground-truth boxes: {GROUND_TRUTH_DETAIL}"


class ProvenanceError(ValueError):
  """A sidecar that does not follow the format, or a mode that is not implemented."""


class GroundTruthBoxesError(ValueError):
  """Benchmark evaluation asked to run with (or score predictions made with) ground-truth boxes, not allowed."""


def ground_truth_refusal(where: str, described: str) -> str:
  return (f"{where}: the proposal source {described!r} gives the model ground-truth boxes; benchmark evaluation "
          f"refuses them, since numbers made with annotated boxes are not comparable with published ones. Use a "
          f"detector's boxes (proposals.source='detections'), 'sam' or 'none', or set allow_gt_boxes=True to "
          f"evaluate with ground-truth boxes anyway (every metrics file then says so)")


def check_sentence_mode(mode: str) -> str:
  """`mode` if implemented; 'merged' and anything else are refused with what is accepted."""
  if mode in SENTENCE_MODES:
    return mode
  if mode == "merged":
    raise ProvenanceError("sentence_mode 'merged' (one sample per ref, its sentences merged) is not implemented: "
                          "the benchmarks score one sample per sentence and define no merged protocol; use "
                          "sentence_mode='per_sentence'")
  raise ProvenanceError(f"sentence_mode {mode!r} unknown; expected one of {sorted(SENTENCE_MODES)}")


@dataclasses.dataclass(frozen=True)
class MadeWith:
  """What a number was made with. `box_source` is the proposal source's `describe()`."""
  box_source: str
  ground_truth_boxes: bool
  sentence_mode: str = "per_sentence"
  checkpoint: str = UNKNOWN
  step: int | None = None
  iou_resolution: str = IOU_RESOLUTION

  @classmethod
  def unknown(cls, why: str) -> "MadeWith":
    """For predictions whose making is not recorded (e.g. another model's file without a sidecar)."""
    return cls(box_source=f"{UNKNOWN} ({why})", ground_truth_boxes=False)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    if self.ground_truth_boxes:
      out["warning"] = GROUND_TRUTH_WARNING
    return out

  @classmethod
  def from_json(cls, value: Any, where: str) -> "MadeWith":
    if not isinstance(value, dict):
      raise ProvenanceError(f"{where}: expected a JSON object, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [name for name in ("box_source", "ground_truth_boxes") if name not in value]
    if missing:
      raise ProvenanceError(f"{where}: field(s) {missing} missing")
    unknown = sorted(set(value) - set(fields) - {"warning"})
    if unknown:
      raise ProvenanceError(f"{where}: unknown field(s) {unknown}; expected {sorted(fields)}")
    if not isinstance(value["ground_truth_boxes"], bool):
      raise ProvenanceError(f"{where}: field 'ground_truth_boxes' must be true or false, got "
                            f"{value['ground_truth_boxes']!r}")
    return cls(**{k: v for k, v in value.items() if k in fields})

  def markdown(self) -> str:
    """The lines metrics.md starts with."""
    step = UNKNOWN if self.step is None else self.step
    sentences = SENTENCE_MODES.get(self.sentence_mode, self.sentence_mode)
    lines = []
    if self.ground_truth_boxes:
      lines += [f"> **GROUND-TRUTH BOXES** ({self.box_source}): {GROUND_TRUTH_DETAIL}.", ""]
    lines.append(f"Made with: boxes {self.box_source}; {sentences}; IoU at the {self.iou_resolution} image "
                 f"resolution; checkpoint {self.checkpoint}, step {step}.")
    return "\n".join(lines) + "\n\n"


def check_made_with(made_with: MadeWith, allow_gt_boxes: bool, where: str) -> None:
  """Predictions made with ground-truth boxes are refused unless `allow_gt_boxes`."""
  if made_with.ground_truth_boxes and not allow_gt_boxes:
    raise GroundTruthBoxesError(ground_truth_refusal(where, made_with.box_source))


def sidecar_path(predictions_path: str) -> str:
  """`dir/predictions.jsonl` → `dir/predictions.meta.json`."""
  stem, _ = os.path.splitext(predictions_path)
  return stem + ".meta.json"


def write_sidecar(predictions_path: str, made_with: MadeWith) -> str:
  path = sidecar_path(predictions_path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temp = f"{path}.tmp-{os.getpid()}"
  with open(temp, "w") as f:
    json.dump(made_with.to_json(), f, indent=2)
    f.write("\n")
  os.replace(temp, path)
  return path


def read_sidecar(predictions_path: str) -> MadeWith | None:
  """The sidecar of a predictions file, or None when it has none."""
  path = sidecar_path(predictions_path)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      value = json.load(f)
  except json.JSONDecodeError as error:
    raise ProvenanceError(f"predictions sidecar {path}: not valid JSON ({error.msg} at line {error.lineno})") \
        from None
  return MadeWith.from_json(value, f"predictions sidecar {path}")
