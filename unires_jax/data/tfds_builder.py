"""Prepared splits as `tfds.data_source`-style random-access sources, without TensorFlow.

TFDS builders need TensorFlow to prepare and decode features, and TensorFlow is not installed here, so the
prepared splits are registered by name instead: `data_source('refcoco', 'val', root)` gives a `__len__` /
`__getitem__` source over samples, the same access pattern Grain and `tfds.data_source` use.
"""

from __future__ import annotations

import dataclasses
import os

from unires_jax.data import records


@dataclasses.dataclass
class PreparedSplitSource:
  """Random access to the samples of one prepared split; item i is `SplitSource.sample(i)`."""
  split_dir: str

  def __post_init__(self):
    self._source = records.SplitSource(self.split_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, sample_index: int) -> dict:
    return self._source.sample(int(sample_index))

  def __getitems__(self, sample_indices) -> list[dict]:
    return [self[i] for i in sample_indices]

  @property
  def index(self) -> dict:
    return self._source.index


def prepared_splits(root: str) -> dict[str, str]:
  """'dataset/split' → folder for every prepared split under `root` (laid out as `root/<dataset>/<split>/`)."""
  found = {}
  for dataset in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    for split in sorted(os.listdir(os.path.join(root, dataset))):
      index_path = os.path.join(root, dataset, split, records.INDEX)
      if os.path.exists(index_path):
        found[f"{dataset}/{split}"] = os.path.join(root, dataset, split)
  return found


def data_source(dataset: str, split: str, root: str) -> PreparedSplitSource:
  """The prepared split `root/<dataset>/<split>`; an unknown one names what is prepared."""
  splits = prepared_splits(root)
  key = f"{dataset}/{split}"
  if key not in splits:
    raise KeyError(f"prepared split {key!r} not found under {root}; prepared: {', '.join(splits) or '(none)'} "
                   "(run scripts/prepare_data.py)")
  return PreparedSplitSource(splits[key])
