"""What `scripts/train.py` runs: prepare the toy data if the config asks for it, train with the evaluation eval/
provides handed to the loop, report. The one module that joins train/ and eval/ (they do not import each other)."""

from __future__ import annotations

import json
import logging

import jax
import ml_collections

from unires_jax import proposals as proposals_lib
from unires_jax.data import pipeline
from unires_jax.eval import trainer_evals
from unires_jax.train import loop, run_lock

log = logging.getLogger(__name__)


def make_evaluate(config, model, params_transform, mesh, rules, workdir):
  """The loop's evaluation, built once before the first step: `config.evals` (eval/trainer_evals.py)."""
  return trainer_evals.build(config, model, params_transform, mesh, rules, workdir)


make_evaluate.check = trainer_evals.check  # before any training: replaced keys, box policy, missing data


def _synthetic_proposals(syn: ml_collections.ConfigDict) -> dict:
  """`prepare_synthetic`'s proposal options from `config.synthetic.proposals` (a `proposals` section; absent: the
  records carry no proposals)."""
  section = syn.get("proposals", None)
  if section is None:
    return {}
  source = proposals_lib.build_source(section)
  if source.is_ground_truth:
    raise ValueError(f"config.synthetic.proposals: {source.describe()} reads annotations; the records' proposals "
                     f"must come from a source that does not (training on annotations is data.box_source)")
  return dict(attach=lambda records: proposals_lib.attach(records, source, pipeline.decode_image),
              proposal_source=source.describe())


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
                            syn.image_size, **_synthetic_proposals(syn))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("toy_data_prepared")
  summary = loop.train(config, workdir, make_evaluate)
  if jax.process_index() == 0:
    printable = {k: v for k, v in summary.items() if k != "state"}
    print(json.dumps(printable, indent=2, default=float))
  return summary
