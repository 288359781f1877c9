"""Computes object and part proposals for a prepared split or a folder of images; writes COCO detection results.

    python scripts/propose.py --config configs/propose.py --split-dir prepared/refcocom/val \
        --out-objects proposals/val_objects.json --out-parts proposals/val_parts.json
    python scripts/propose.py --config configs/propose.py --images photos/ --out-objects o.json --out-parts p.json \
        --config.proposals.source=sam --config.proposals.sam.checkpoint=runs/sam --config.batch_size=4

The source is `config.proposals.source` (unires_jax/proposals), fed `config.batch_size` images a call. Each output
file is a JSON list `[{image_id, bbox: [x, y, w, h], score, category_id: 1}]`, images in input order and boxes best
first. `image_id` is the record's `image_id` for a split (read it back with `match_by='image_id'`) and the image's
file name for a folder (`match_by='file_name'`), so `scripts/prepare_data.py --object-proposals` and the
`detections` source read these files as they are.

Resuming: finished images go to `<first output>.progress.jsonl` after every batch (a header line names the source
and the inputs). A rerun with the same source and inputs skips them and writes the same files; the progress file is
removed once the outputs are complete (a rerun after that computes everything again). Known errors print one line
and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Iterator, Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from PIL import Image  # noqa: E402

from unires_jax import proposals  # noqa: E402
from unires_jax.data import pipeline, records  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "propose.py")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CATEGORY_ID = 1  # proposals are class-agnostic
PROGRESS_SUFFIX = ".progress.jsonl"
KINDS = ("object", "part")


class ProposeError(ValueError):
  """A known problem with the inputs, outputs or progress file."""


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The images to propose for: `record(i)` gives the i-th as a record-like dict (proposals.attach reads it),
  `output_id(record)` its id in the results files."""
  description: str
  count: int
  record: Callable[[int], dict]
  decode: Callable[[dict], np.ndarray]
  output_id: Callable[[dict], int | str]
  match_by: str


def split_inputs(split_dir: str) -> Inputs:
  source = records.SplitSource(split_dir)
  return Inputs(description=f"split {os.path.abspath(split_dir)}", count=source.num_records, record=source.record,
                decode=pipeline.decode_image, output_id=lambda record: int(record["image_id"]), match_by="image_id")


def _read_pixels(record: dict) -> np.ndarray:
  try:
    with Image.open(record["path"]) as image:
      return np.asarray(image.convert("RGB"), np.uint8)  # [h, w, 3]
  except OSError as error:
    raise ProposeError(f"image {record['path']} cannot be read ({error})") from None


def folder_inputs(directory: str) -> Inputs:
  if not os.path.isdir(directory):
    raise ProposeError(f"--images {directory!r} is not a folder")
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise ProposeError(f"--images {directory!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

  def record(position: int) -> dict:
    path = os.path.join(directory, names[position])
    try:
      with Image.open(path) as image:
        width, height = image.size
    except OSError as error:
      raise ProposeError(f"image {path} cannot be read ({error})") from None
    return {"image_id": position, "file_name": names[position], "height": height, "width": width, "path": path,
            "annotations": [], "refs": []}

  return Inputs(description=f"images {os.path.abspath(directory)}", count=len(names), record=record,
                decode=_read_pixels, output_id=lambda r: r["file_name"], match_by="file_name")


class Progress:
  """The progress file: a header line, then one JSON line per finished image (its position, id and boxes)."""

  def __init__(self, path: str, header: dict):
    self.path = path
    self.header = header
    self.finished: dict[int, dict] = {}
    if os.path.exists(path):
      self._load()
    else:
      with open(path, "w") as f:
        f.write(json.dumps(header) + "\n")
    self._file = open(path, "a")

  def _load(self) -> None:
    with open(self.path) as f:
      lines = f.read().split("\n")
    good_length = 0
    for number, line in enumerate(lines, 1):
      if not line:
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:
        if number >= len(lines) - 1:  # the last line, cut by an interruption: dropped and redone
          break
        raise ProposeError(f"progress file {self.path} line {number} is not valid JSON; delete the file to "
                           f"start over") from None
      if number == 1 and entry != self.header:
        raise ProposeError(f"progress file {self.path} was written for {entry.get('source')!r} on "
                           f"{entry.get('inputs')!r}, not {self.header['source']!r} on {self.header['inputs']!r}; "
                           f"delete it to start over")
      if number > 1:
        self.finished[int(entry["position"])] = entry
      good_length += len(line) + 1
    with open(self.path, "r+") as f:
      f.truncate(good_length)
      if good_length == 0:  # even the header was cut
        f.write(json.dumps(self.header) + "\n")

  def add(self, entries: Sequence[dict]) -> None:
    for entry in entries:
      self._file.write(json.dumps(entry) + "\n")
      self.finished[int(entry["position"])] = entry
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()


def results(entries: Sequence[dict], kind: str) -> list[dict]:
  """COCO detection results of one kind: (x0, y0, x1, y1) boxes → [x, y, w, h], entries in the given order."""
  out = []
  for entry in entries:
    for (x0, y0, x1, y1), score in zip(entry[kind], entry[f"{kind}_scores"]):
      out.append({"image_id": entry["id"], "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score,
                  "category_id": CATEGORY_ID})
  return out


def _write_json(path: str, value) -> None:
  temp = f"{path}.tmp-{os.getpid()}"
  with open(temp, "w") as f:
    json.dump(value, f)
  os.replace(temp, path)


def propose(config, inputs: Inputs, outputs: dict[str, str]) -> dict:
  """Runs the source over the unfinished images, then writes `outputs` ({kind: path}); returns the run's figures."""
  source = proposals.build_source(config.proposals)
  batch_size = int(config.batch_size)
  if batch_size < 1:
    raise ProposeError(f"config.batch_size must be >= 1, got {batch_size}")
  first_output = next(iter(outputs.values()))
  progress = Progress(first_output + PROGRESS_SUFFIX,
                      {"source": source.describe(), "inputs": inputs.description, "images": inputs.count})
  resumed = len(progress.finished)
  pending = [i for i in range(inputs.count) if i not in progress.finished]

  def pending_records() -> Iterator[dict]:
    for position in pending:
      yield {**inputs.record(position), "position": position}

  bar = tqdm.tqdm(total=inputs.count, initial=resumed, desc="proposals", unit="image",
                  disable=not config.get("progress", True))
  start = time.perf_counter()
  batch: list[dict] = []
  try:
    for record in proposals.attach(pending_records(), source, inputs.decode, batch_size=batch_size):
      found = record["proposals"]
      batch.append({"position": record["position"], "id": inputs.output_id(record),
                    **{key: found[key] for kind in KINDS for key in (kind, f"{kind}_scores")}})
      if len(batch) == batch_size:
        progress.add(batch)
        bar.update(len(batch))
        batch = []
    progress.add(batch)
    bar.update(len(batch))
  finally:
    progress.close()
    bar.close()
  seconds = time.perf_counter() - start
  ordered = [progress.finished[i] for i in range(inputs.count)]
  for kind, path in outputs.items():
    _write_json(path, results(ordered, kind))
  os.remove(progress.path)
  computed = len(pending)
  return {"source": source.describe(), "inputs": inputs.description, "images": inputs.count, "resumed": resumed,
          "computed": computed, "seconds": seconds, "images_per_second": computed / seconds if seconds else 0.0,
          "boxes": {kind: sum(len(e[kind]) for e in ordered) for kind in KINDS}, "outputs": dict(outputs),
          "match_by": inputs.match_by, "summary": list(getattr(source, "summary_lines", lambda: [])())}


def _parse(argv: Sequence[str]) -> flags.FlagValues:
  argv = list(argv)
  if not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
  values = flags.FlagValues()
  # sys_argv: the overrides (--config.x=...) are found in these arguments, not in sys.argv.
  config_flags.DEFINE_config_file("config", None, "configs/propose.py[:arg] (the default)", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("split-dir", "", "a prepared split (scripts/prepare_data.py output)", flag_values=values)
  flags.DEFINE_string("images", "", "a folder of images (instead of --split-dir)", flag_values=values)
  flags.DEFINE_string("out-objects", "", "object proposals JSON to write", flag_values=values)
  flags.DEFINE_string("out-parts", "", "part proposals JSON to write", flag_values=values)
  try:
    values(argv)
  except flags.Error as error:
    raise ProposeError(str(error)) from None
  return values


def main(argv: Sequence[str]) -> dict:
  """`argv[0]` is the program name (absl style); returns `propose`'s figures."""
  values = _parse(argv)
  split_dir, images = values["split-dir"].value, values["images"].value
  if bool(split_dir) == bool(images):
    raise ProposeError("give exactly one of --split-dir and --images")
  outputs = {kind: values[f"out-{kind}s"].value for kind in KINDS if values[f"out-{kind}s"].value}
  if not outputs:
    raise ProposeError("give --out-objects and/or --out-parts")
  if len(set(outputs.values())) < len(outputs):
    raise ProposeError("--out-objects and --out-parts must be different files")
  for path in outputs.values():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  inputs = split_inputs(split_dir) if split_dir else folder_inputs(images)
  figures = propose(values.config, inputs, outputs)
  print(f"{figures['images']} images ({figures['resumed']} resumed, {figures['computed']} computed in "
        f"{figures['seconds']:.2f} s: {figures['images_per_second']:.2f} images/s, batch {values.config.batch_size}) "
        f"with {figures['source']}")
  for kind, path in outputs.items():
    print(f"  {figures['boxes'][kind]} {kind} boxes -> {path} (read back with match_by={figures['match_by']!r})")
  for line in figures["summary"]:
    print(line)
  return figures


if __name__ == "__main__":
  try:
    main(sys.argv)
  except (ProposeError, FileNotFoundError, KeyError, ValueError) as error:
    print(f"propose.py: error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
    sys.exit(2)
