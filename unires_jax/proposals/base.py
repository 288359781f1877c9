"""The proposal-source contract: images in, object and part boxes (with scores) out, and the source's name.

A source is registered in `SOURCES` under the name `config.proposals.source` selects; it is built from the whole
`proposals` config section (`build_source`). Boxes are `(x0, y0, x1, y1)` float32 in original image pixels. Every
source says what it is (`describe()`), and that description travels into records (`proposals.source`) and into
every metrics file, so a number always says which boxes it was made with. `is_ground_truth` marks sources that read
annotations: benchmark evaluation refuses them unless `allow_gt_boxes=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import ml_collections
import numpy as np

from unires_jax import registry

SOURCES = registry.Registry("proposal source")


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """One image as a source sees it. `pixels()` decodes on demand (uint8 [h, w, 3]); `annotations` are the record's
  annotations (docs/DESIGN.md), read only by the ground-truth source."""
  image_id: int
  file_name: str
  height: int
  width: int
  pixels: Callable[[], np.ndarray]
  annotations: tuple[dict, ...] = ()
  split: str = ""


@dataclasses.dataclass(frozen=True)
class ImageProposals:
  """Boxes of one image: objects [No, 4] and parts [Np, 4] with scores [No] / [Np], best first."""
  object_boxes: np.ndarray
  part_boxes: np.ndarray
  object_scores: np.ndarray
  part_scores: np.ndarray

  def to_record(self, source: str) -> dict:
    """The record's `proposals` entry (docs/DESIGN.md)."""
    return {"object": [[float(v) for v in box] for box in self.object_boxes],
            "part": [[float(v) for v in box] for box in self.part_boxes],
            "object_scores": [float(s) for s in self.object_scores],
            "part_scores": [float(s) for s in self.part_scores],
            "source": source}


def empty_proposals() -> ImageProposals:
  return ImageProposals(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                        np.zeros((0,), np.float32))


class ProposalSource(Protocol):
  """What every registered source is. `__call__` takes a batch of images and returns one entry per image."""
  is_ground_truth: bool

  def describe(self) -> str: ...

  def __call__(self, images: Sequence[ImageInput]) -> list[ImageProposals]: ...


def build_source(config: ml_collections.ConfigDict) -> ProposalSource:
  """The source `config.source` names, built from the whole `proposals` section."""
  return SOURCES.lookup(config.source)(config)


def _image_input(record: dict, decode: Callable[[dict], np.ndarray]) -> ImageInput:
  return ImageInput(image_id=int(record["image_id"]), file_name=str(record["file_name"]),
                    height=int(record["height"]), width=int(record["width"]), pixels=lambda: decode(record),
                    annotations=tuple(record["annotations"]),
                    split=str(record["refs"][0]["split"]) if record.get("refs") else "")


def attach(records: Iterable[dict], source: ProposalSource, decode: Callable[[dict], np.ndarray],
           batch_size: int = 8) -> Iterator[dict]:
  """Records with `proposals` replaced by the source's boxes, in order; the source sees `batch_size` images a call.

  `decode(record)` turns a record into uint8 pixels (data.pipeline.decode_image).
  """
  pending: list[dict] = []

  def flush() -> Iterator[dict]:
    found = source([_image_input(record, decode) for record in pending])
    if len(found) != len(pending):
      raise ValueError(f"proposal source {source.describe()} returned {len(found)} entries for {len(pending)} images")
    for record, proposals in zip(pending, found):
      yield {**record, "proposals": proposals.to_record(source.describe())}
    pending.clear()

  for record in records:
    pending.append(record)
    if len(pending) >= batch_size:
      yield from flush()
  if pending:
    yield from flush()
