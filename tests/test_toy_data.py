"""The toy run's data: synthetic records prepared with pixel proposals, re-prepared when the source changes, and
ground-truth sources refused as the records' proposals."""

import ml_collections
import pytest

from configs import common
from unires_jax import proposals as proposals_lib
from unires_jax import run as runner
from unires_jax.data import pipeline, records, toy


def _prepare(tmp_path, **options):
  return toy.prepare_synthetic(str(tmp_path / "synthetic"), str(tmp_path / "prepared"), ["synthetic_cris"],
                               ["val"], num_images=12, seed=0, image_size=(96, 128), **options)


def test_records_carry_the_pixel_proposals_and_a_changed_source_prepares_again(tmp_path):
  syn = ml_collections.ConfigDict({"proposals": common.proposals_config("colour_regions")})
  options = runner._synthetic_proposals(syn)
  description = proposals_lib.build_source(syn.proposals).describe()
  assert options["proposal_source"] == description
  split_dir = _prepare(tmp_path, **options)["synthetic_cris/val"]
  index = records.read_index(split_dir)
  assert index["proposals"]["sources"] == {description: index["num_images"]}
  source = records.SplitSource(split_dir)
  for i in range(source.num_records):
    record = source.record(i)
    found = proposals_lib.build_source(syn.proposals)([proposals_lib.base._image_input(record, pipeline.decode_image)])
    assert record["proposals"]["object"] == found[0].to_record(description)["object"]
    assert len(record["proposals"]["object"]) == sum(a["granularity"] == "object" for a in record["annotations"])
  # The same source again: reused as it is. No source: prepared again, without proposals.
  assert _prepare(tmp_path, **options)["synthetic_cris/val"] == split_dir
  _prepare(tmp_path)
  assert records.read_index(split_dir)["proposals"]["sources"] == {records.NO_BOXES_SOURCE: index["num_images"]}


def test_ground_truth_boxes_are_refused_as_the_records_proposals():
  syn = ml_collections.ConfigDict({"proposals": common.proposals_config("annotations")})
  with pytest.raises(ValueError, match="config.synthetic.proposals: .*reads annotations"):
    runner._synthetic_proposals(syn)
  assert runner._synthetic_proposals(ml_collections.ConfigDict({})) == {}
