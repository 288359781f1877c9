"""predictions.jsonl: one line per (ref_id, sent_id) with its mask as COCO compressed RLE; writer and reader.

A line is `{"dataset", "split", "ref_id", "sent_id", "mask": {"size": [h, w], "counts": "<RLE>"}}` plus an
optional `"no_target": bool` and an optional `"invalid": bool`. Without `no_target` the prediction is "no target"
exactly when its mask is empty; `"no_target": true` makes the prediction empty whatever the mask holds (a model
with a separate no-target decision may keep its mask for inspection). `"invalid": true` marks an answer that could
not be parsed (unires_jax/eval/answers.py): it is scored as an empty mask and counted. Masks are at the original
image resolution. How the predictions were made lives in a sidecar (`unires_jax/eval/provenance.py`).

Reading validates every line and decodes the RLE string with a bounds check of its own (the run lengths must
sum to h·w), since pycocotools' decoder writes past its buffer on a malformed string.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import IO, Iterable, Iterator

import numpy as np
from pycocotools import mask as mask_utils

REQUIRED_FIELDS = ("dataset", "split", "ref_id", "sent_id", "mask")
OPTIONAL_FIELDS = ("no_target", "invalid")


class PredictionsError(ValueError):
  """A predictions file line that does not follow the format; the message names the file, line and field."""


# ------------------------------------------------------------------------------------------------------ RLE


def encode_mask(mask: np.ndarray) -> dict:
  """bool [h, w] → `{"size": [h, w], "counts": str}` (COCO compressed RLE, column-major)."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask must be 2-D [h, w], got shape {mask.shape}")
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def rle_counts(counts: str) -> np.ndarray:
  """The run lengths [R] int64 of a compressed RLE string (5 bits per char with a continuation bit, runs after
  the second stored as the difference to the run two before). Raises ValueError on a malformed string."""
  try:
    raw = counts.encode("ascii")
  except UnicodeEncodeError as error:
    raise ValueError("RLE counts hold a non-ASCII character") from error
  codes = np.frombuffer(raw, np.uint8).astype(np.int64) - 48  # [N]
  if codes.size == 0:
    raise ValueError("RLE counts are empty")
  if codes.min() < 0 or codes.max() > 63:
    raise ValueError("RLE counts hold a character outside '0'..'o'")
  more = (codes & 0x20) != 0
  if more[-1]:
    raise ValueError("RLE counts end in the middle of a number")
  ends = ~more
  starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))  # first char of each number
  number = np.cumsum(np.concatenate([[0], ends[:-1].astype(np.int64)]))  # [N] which number a char belongs to
  digit = np.arange(codes.size) - starts[number]  # [N] position of a char inside its number
  if digit.max() >= 8:
    raise ValueError("RLE counts hold a number longer than 8 characters")
  values = np.zeros(starts.size, np.int64)  # [R]
  np.add.at(values, number, (codes & 0x1f) << (5 * digit))
  last = np.flatnonzero(ends)
  negative = (codes[last] & 0x10) != 0
  values[negative] -= np.int64(1) << (5 * (digit[last][negative] + 1))  # sign-extend
  runs = values.copy()
  runs[1::2] = np.cumsum(values[1::2])   # run 3 adds run 1, run 5 adds run 3, ...
  runs[2::2] = np.cumsum(values[2::2])   # run 4 adds run 2, ...; runs 0 and 2 are stored as they are
  if runs.min() < 0:
    raise ValueError("RLE counts decode to a negative run length")
  return runs


def decode_mask(rle: dict) -> np.ndarray:
  """`{"size": [h, w], "counts": str}` → bool [h, w]; ValueError when the runs do not cover h·w pixels."""
  height, width = (int(v) for v in rle["size"])
  runs = rle_counts(rle["counts"])
  if int(runs.sum()) != height * width:
    raise ValueError(f"RLE run lengths sum to {int(runs.sum())}, expected h*w = {height}*{width} = "
                     f"{height * width}")
  values = (np.arange(runs.size) % 2).astype(bool)  # runs alternate 0, 1, 0, ...
  flat = np.repeat(values, runs)  # [w * h], column-major
  return flat.reshape(width, height).T


def rle_area(rle: dict) -> int:
  """Foreground pixels of an RLE mask, from its run lengths alone."""
  return int(rle_counts(rle["counts"])[1::2].sum())


# ------------------------------------------------------------------------------------------------ records


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One line of predictions.jsonl."""
  dataset: str
  split: str
  ref_id: int
  sent_id: int
  mask: dict  # {"size": [h, w], "counts": str}
  no_target: bool | None = None
  invalid: bool | None = None

  @property
  def key(self) -> tuple[int, int]:
    return (self.ref_id, self.sent_id)

  @property
  def size(self) -> tuple[int, int]:
    return int(self.mask["size"][0]), int(self.mask["size"][1])

  def predicted_mask(self) -> np.ndarray:
    """bool [h, w]: the mask the metrics see (empty when `no_target` or `invalid` is true)."""
    if self.no_target or self.invalid:
      return np.zeros(self.size, bool)
    return decode_mask(self.mask)

  def to_json(self) -> dict:
    line = {"dataset": self.dataset, "split": self.split, "ref_id": self.ref_id, "sent_id": self.sent_id,
            "mask": {"size": list(self.size), "counts": self.mask["counts"]}}
    if self.no_target is not None:
      line["no_target"] = bool(self.no_target)
    if self.invalid is not None:
      line["invalid"] = bool(self.invalid)
    return line

  @classmethod
  def from_mask(cls, dataset: str, split: str, ref_id: int, sent_id: int, mask: np.ndarray,
                no_target: bool | None = None, invalid: bool | None = None) -> "Prediction":
    return cls(dataset, split, int(ref_id), int(sent_id), encode_mask(mask), no_target, invalid)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def parse_line(text: str, where: str) -> Prediction:
  """One JSON line → Prediction; `where` (file and line number) names it in errors."""
  try:
    line = json.loads(text)
  except json.JSONDecodeError as error:
    raise PredictionsError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
  if not isinstance(line, dict):
    raise PredictionsError(f"{where}: expected a JSON object, got {type(line).__name__}")
  for field in REQUIRED_FIELDS:
    if field not in line:
      raise PredictionsError(f"{where}: field {field!r} missing")
  unknown = sorted(set(line) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
  if unknown:
    raise PredictionsError(f"{where}: unknown field(s) {unknown}; expected {REQUIRED_FIELDS + OPTIONAL_FIELDS}")
  for field in ("dataset", "split"):
    if not isinstance(line[field], str) or not line[field]:
      raise PredictionsError(f"{where}: field {field!r} must be a non-empty string, got {line[field]!r}")
  for field in ("ref_id", "sent_id"):
    if not _is_int(line[field]):
      raise PredictionsError(f"{where}: field {field!r} must be an integer, got {line[field]!r}")
  for field in OPTIONAL_FIELDS:
    if field in line and not isinstance(line[field], bool):
      raise PredictionsError(f"{where}: field {field!r} must be true or false, got {line[field]!r}")
  mask = line["mask"]
  if not isinstance(mask, dict) or set(mask) != {"size", "counts"}:
    raise PredictionsError(f"{where}: field 'mask' must be an object with exactly 'size' and 'counts', "
                           f"got {mask!r:.80}")
  size = mask["size"]
  if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
    raise PredictionsError(f"{where}: field 'mask.size' must be [h, w] positive integers, got {size!r}")
  if not isinstance(mask["counts"], str):
    raise PredictionsError(f"{where}: field 'mask.counts' must be a compressed RLE string, "
                           f"got {type(mask['counts']).__name__}")
  try:
    runs = rle_counts(mask["counts"])
  except ValueError as error:
    raise PredictionsError(f"{where}: field 'mask.counts': {error}") from None
  if int(runs.sum()) != size[0] * size[1]:
    raise PredictionsError(f"{where}: field 'mask.counts' covers {int(runs.sum())} pixels, mask.size {size} "
                           f"has {size[0] * size[1]}")
  return Prediction(line["dataset"], line["split"], line["ref_id"], line["sent_id"],
                    {"size": list(size), "counts": mask["counts"]}, line.get("no_target"), line.get("invalid"))


def iter_predictions(path: str) -> Iterator[tuple[int, Prediction]]:
  """(1-based line number, Prediction) for each non-blank line of a predictions file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"predictions file {path} not found")
  if os.path.isdir(path):
    raise IsADirectoryError(f"predictions path {path} is a directory; expected a predictions .jsonl file (one JSON "
                            f"object per line)")
  with open(path) as f:
    for number, text in enumerate(f, start=1):
      if text.strip():
        yield number, parse_line(text, f"predictions {path} line {number}")


def read_predictions(path: str) -> list[Prediction]:
  return [prediction for _, prediction in iter_predictions(path)]


class PredictionsWriter:
  """Writes predictions.jsonl atomically: lines go to a temporary file renamed into place on close."""

  def __init__(self, path: str):
    self.path = path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    self._temp = f"{path}.tmp-{os.getpid()}"
    self._file: IO[str] | None = open(self._temp, "w")
    self.count = 0

  def write(self, prediction: Prediction) -> None:
    if self._file is None:
      raise ValueError(f"predictions writer for {self.path} is closed")
    self._file.write(json.dumps(prediction.to_json(), separators=(",", ":")) + "\n")
    self.count += 1

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
      os.replace(self._temp, self.path)

  def abort(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
      os.remove(self._temp)

  def __enter__(self) -> "PredictionsWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_predictions(path: str, predictions: Iterable[Prediction]) -> int:
  """Writes every prediction; returns how many."""
  with PredictionsWriter(path) as writer:
    for prediction in predictions:
      writer.write(prediction)
  return writer.count
