"""What `scripts/train.py` runs: prepare the toy data if the config asks for it, train, report."""

from __future__ import annotations

import json
import logging

import jax
import ml_collections

from unires_jax.train import loop, run_lock

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  with run_lock.hold(workdir):  # before the toy data is written into the workdir
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config = loop.resolve_workdir_paths(config, workdir)
  if "synthetic" in config:
    from unires_jax.data import toy
    syn = config.synthetic
    if jax.process_index() == 0:
      toy.prepare_synthetic(syn.root, syn.prepared_dir, syn.layouts, syn.splits, syn.num_images, syn.seed,
                            syn.image_size)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("toy_data_prepared")
  summary = loop.train(config, workdir)
  if jax.process_index() == 0:
    printable = {k: v for k, v in summary.items() if k != "state"}
    print(json.dumps(printable, indent=2, default=float))
  return summary
