"""The page's examples: synthetic-set scenes (a seed the toy run does not train on) with a phrase of every
granularity, one of them naming something that is not there."""

from __future__ import annotations

import dataclasses
import os

from unires_jax.data import synthetic
from unires_jax.data import datasets

GRANULARITIES = ("object", "multi-object", "part", "no-target")
EXAMPLE_SEED = 1  # the toy run's synthetic set uses seed 0
EXAMPLE_IMAGES = len(synthetic.SPLIT_CYCLE)  # one cycle: every split holds an image
# object, multi-object and no-target refs come in the gRefCOCO layout, parts in the CRIS layout
LAYOUT_READERS = ("synthetic_grefcoco", "synthetic_cris")


@dataclasses.dataclass(frozen=True)
class Example:
  image: str        # path of a PNG
  phrase: str
  granularity: str  # what the synthetic set's reference is: one of GRANULARITIES


def make_examples(out_dir: str, per_granularity: int = 1, seed: int = EXAMPLE_SEED) -> list[Example]:
  """Generates the scenes into `out_dir` (reused when already there) and returns `per_granularity` examples of
  each granularity, in the order of GRANULARITIES."""
  data_dir = synthetic.ensure_synthetic(out_dir, num_images=EXAMPLE_IMAGES, seed=seed)
  found: dict[str, list[Example]] = {g: [] for g in GRANULARITIES}
  for name in LAYOUT_READERS:
    read = datasets.DATASETS.lookup(name)
    for split in dict.fromkeys(synthetic.SPLIT_CYCLE):
      for record in read(data_dir, split):
        image = os.path.join(data_dir, "images", record["file_name"])
        for ref in record["refs"]:
          examples = found[ref["granularity"]]
          if len(examples) < per_granularity and ref["sentences"]:
            examples.append(Example(image, ref["sentences"][0]["sent"], ref["granularity"]))
  missing = [g for g, examples in found.items() if len(examples) < per_granularity]
  if missing:
    raise ValueError(f"synthetic examples in {data_dir!r}: fewer than {per_granularity} reference(s) of {missing}")
  return [example for g in GRANULARITIES for example in found[g]]
