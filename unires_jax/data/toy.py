"""The toy run's data: the synthetic multi-granularity set, generated and prepared into records on first use."""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

from unires_jax.data import records, synthetic
from unires_jax.data import datasets

log = logging.getLogger(__name__)


def prepare_synthetic(root: str, prepared_dir: str, layouts, splits, num_images: int, seed: int,
                      image_size, attach: Callable[[Iterable[dict]], Iterable[dict]] | None = None,
                      proposal_source: str = records.NO_BOXES_SOURCE) -> dict[str, str]:
  """Generates the synthetic set under `root` (if absent) and prepares `layout/split` record directories.

  `attach` (records → records with `proposals`, e.g. `unires_jax.proposals.attach` with a source) fills the
  records' proposals before they are written; `proposal_source` is that source's description. A split already
  prepared with the same proposal source is reused; one prepared with another is prepared again.
  Returns {'layout/split': prepared directory}.
  """
  synthetic.ensure_synthetic(root, num_images=int(num_images), seed=int(seed), image_size=tuple(image_size))
  out = {}
  for layout in layouts:
    for split in splits:
      split_dir = os.path.join(prepared_dir, layout, split)
      if not _prepared_with(split_dir, proposal_source):
        reader = datasets.DATASETS.lookup(layout)
        samples = reader(root, split)
        index = records.write_split(attach(samples) if attach else samples, split_dir, num_shards=1,
                                    dataset="synthetic", split=split)
        log.info("prepared %s/%s: %d images, %d samples (proposals: %s)", layout, split, index["num_images"],
                 index["num_samples"], proposal_source)
      out[f"{layout}/{split}"] = split_dir
  return out


def _prepared_with(split_dir: str, proposal_source: str) -> bool:
  if not os.path.exists(os.path.join(split_dir, records.INDEX)):
    return False
  sources = records.read_index(split_dir).get("proposals", {}).get("sources", {})
  return set(sources) == {proposal_source}
