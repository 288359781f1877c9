"""The dataset registry: `DATASETS.lookup(name)` gives a `DatasetReader` (records plus the source files)."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

from unires_jax import registry

DATASETS = registry.Registry("dataset")


@dataclasses.dataclass(frozen=True)
class DatasetReader:
  """A registered dataset: `__call__` iterates records; `source_files` lists the files whose checksums we keep."""
  read: Callable[..., Iterator[dict]]
  list_sources: Callable[..., list[str]]
  defaults: dict

  def __call__(self, data_dir: str, split: str, **options) -> Iterator[dict]:
    return self.read(data_dir, split, **{**self.defaults, **options})

  def source_files(self, data_dir: str, split: str, **options) -> list[str]:
    return self.list_sources(data_dir, split, **{**self.defaults, **options})


def register(dataset_name: str, read, sources, **defaults) -> None:
  """Adds a layout to `DATASETS` (readers of other modules, e.g. refcocom.py and synthetic.py, register themselves)."""
  DATASETS.register(dataset_name)(DatasetReader(read, sources, defaults))


def in_subfolder(read, sources, subdir: str, **defaults) -> DatasetReader:
  """A layout read from a sub-folder of one root (`data_dir`) whose images live in `<root>/images` (the synthetic
  set writes all four layouts so)."""
  def read_synthetic(data_dir, split, **options):
    options.setdefault("image_dir", os.path.join(data_dir, "images"))
    return read(os.path.join(data_dir, subdir), split, **options)

  def synthetic_sources(data_dir, split, **options):
    return sources(os.path.join(data_dir, subdir), split, **options)

  return DatasetReader(read_synthetic, synthetic_sources, dict(defaults))
