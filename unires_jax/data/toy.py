"""The toy run's data: the synthetic multi-granularity set, generated and prepared into records on first use."""

from __future__ import annotations

import logging
import os

from unires_jax.data import records, synthetic
from unires_jax.data import datasets

log = logging.getLogger(__name__)


def prepare_synthetic(root: str, prepared_dir: str, layouts, splits, num_images: int, seed: int,
                      image_size) -> dict[str, str]:
  """Generates the synthetic set under `root` (if absent) and prepares `layout/split` record directories.

  Returns {'layout/split': prepared directory}. Already prepared splits are reused.
  """
  synthetic.ensure_synthetic(root, num_images=int(num_images), seed=int(seed), image_size=tuple(image_size))
  out = {}
  for layout in layouts:
    for split in splits:
      split_dir = os.path.join(prepared_dir, layout, split)
      if not os.path.exists(os.path.join(split_dir, records.INDEX)):
        reader = datasets.DATASETS.lookup(layout)
        index = records.write_split(reader(root, split), split_dir, num_shards=1, dataset="synthetic", split=split)
        log.info("prepared %s/%s: %d images, %d samples", layout, split, index["num_images"], index["num_samples"])
      out[f"{layout}/{split}"] = split_dir
  return out
