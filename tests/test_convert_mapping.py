import numpy as np
import pytest

from unires_jax.convert import mapping


def _table():
  return (mapping.linear("proj", "proj")
          + [mapping.Entry.make("layers/w/kernel", "blocks.{i}.w.weight", mapping.linear_to_jax,
                                mapping.linear_to_torch, stacked=True)]
          + [mapping.Entry.make("qkv/kernel", ("q.weight", "k.weight"),
                                lambda q, k: np.concatenate([q.T, k.T], axis=1),
                                lambda w: (w[:, :2].T, w[:, 2:].T))])


def _state_dict():
  rng = np.random.default_rng(0)
  return {"proj.weight": rng.normal(size=(3, 5)), "proj.bias": rng.normal(size=(3,)),
          "blocks.0.w.weight": rng.normal(size=(4, 2)), "blocks.1.w.weight": rng.normal(size=(4, 2)),
          "q.weight": rng.normal(size=(2, 6)), "k.weight": rng.normal(size=(2, 6))}


def test_import_transposes_stacks_and_merges():
  sd = _state_dict()
  flat, report = mapping.import_params(_table(), sd, num_layers=2)
  np.testing.assert_array_equal(flat["proj/kernel"], sd["proj.weight"].T)
  assert flat["layers/w/kernel"].shape == (2, 2, 4)
  np.testing.assert_array_equal(flat["layers/w/kernel"][1], sd["blocks.1.w.weight"].T)
  np.testing.assert_array_equal(flat["qkv/kernel"][:, 2:], sd["k.weight"].T)
  assert len(report["mapped"]) == len(sd)


def test_round_trip_is_bit_exact():
  sd = _state_dict()
  flat, _ = mapping.import_params(_table(), sd, num_layers=2)
  back = mapping.export_params(_table(), flat)
  assert set(back) == set(sd)
  for name in sd:
    np.testing.assert_array_equal(back[name], sd[name])


def test_unmapped_missing_and_wrong_shape_are_named():
  sd = _state_dict()
  with pytest.raises(KeyError, match="extra.weight"):
    mapping.import_params(_table(), {**sd, "extra.weight": np.zeros(1)}, num_layers=2)
  del sd["blocks.1.w.weight"]
  with pytest.raises(KeyError, match="blocks.1.w.weight"):
    mapping.import_params(_table(), sd, num_layers=2)
  sd = _state_dict()
  expected = {"proj/kernel": (5, 4), "proj/bias": (3,), "layers/w/kernel": (2, 2, 4), "qkv/kernel": (6, 4)}
  with pytest.raises(ValueError, match="proj.weight"):
    mapping.import_params(_table(), sd, num_layers=2, expected=expected)


def test_a_wrong_size_layer_of_a_stack_is_named():
  sd = _state_dict()
  sd["blocks.1.w.weight"] = np.zeros((4, 3))
  with pytest.raises(ValueError, match="blocks.1.w.weight"):
    mapping.import_params(_table(), sd, num_layers=2)
  expected = {"proj/kernel": (5, 3), "proj/bias": (3,), "layers/w/kernel": (2, 3, 4), "qkv/kernel": (6, 4)}
  with pytest.raises(ValueError, match="blocks.0.w.weight"):
    mapping.import_params(_table(), _state_dict(), num_layers=2, expected=expected)
