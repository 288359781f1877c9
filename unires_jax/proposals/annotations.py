"""Two trivial sources: `annotations` (the image's ground-truth boxes, for training) and `none` (no boxes at all)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from unires_jax.data import records
from unires_jax.proposals.base import SOURCES, ImageInput, ImageProposals, empty_proposals


def _boxes(annotations, granularity: str) -> np.ndarray:
  return np.asarray([a["bbox"] for a in annotations if a["granularity"] == granularity], np.float32).reshape(-1, 4)


@SOURCES.register("annotations")
class AnnotationBoxes:
  """Ground-truth object and part boxes. Allowed for training; benchmark evaluation refuses it unless asked."""
  is_ground_truth = True

  def __init__(self, config=None):
    del config

  def describe(self) -> str:
    return records.GT_BOXES_SOURCE

  def __call__(self, images: Sequence[ImageInput]) -> list[ImageProposals]:
    out = []
    for image in images:
      objects, parts = _boxes(image.annotations, "object"), _boxes(image.annotations, "part")
      out.append(ImageProposals(objects, parts, np.ones((len(objects),), np.float32),
                                np.ones((len(parts),), np.float32)))
    return out


@SOURCES.register("none")
class NoBoxes:
  """No proposals: every object and part slot is masked."""
  is_ground_truth = False

  def __init__(self, config=None):
    del config

  def describe(self) -> str:
    return records.NO_BOXES_SOURCE

  def __call__(self, images: Sequence[ImageInput]) -> list[ImageProposals]:
    return [empty_proposals() for _ in images]
