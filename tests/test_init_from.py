"""`train.init_from`: parameters from an imported checkpoint, placed into the run's shardings."""

import jax
import numpy as np
import pytest

from configs import common, tiny
from unires_jax import sharding
from unires_jax.convert import checkpoints as checkpoint_io
from unires_jax.models.example_batch import example_batch
from unires_jax.train import loop, state as state_lib


@pytest.fixture(scope="module")
def fresh():
  config = tiny.get_config()
  model = state_lib.build_model(config.model)
  batch = example_batch(model.config, batch_size=8)
  mesh = sharding.make_mesh(common.mesh_config(data=2, fsdp=4))
  rules = sharding.rules_from_config(config.sharding_rules)
  source, _ = state_lib.create_sharded_state(model, batch, mesh, rules, jax.random.key(1))
  target, shardings = state_lib.create_sharded_state(model, batch, mesh, rules, jax.random.key(2))
  return source.params, target.params, shardings.params


def test_loaded_params_equal_the_source_and_keep_their_shardings(tmp_path, fresh):
  source, target, shardings = fresh
  checkpoint_io.save_params(str(tmp_path), jax.device_get(source))
  placed = loop.load_initial_params(str(tmp_path), target, shardings)
  for a, b, s in zip(jax.tree.leaves(placed), jax.tree.leaves(source), jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == s
  assert not np.array_equal(np.asarray(jax.tree.leaves(target)[0]), np.asarray(jax.tree.leaves(placed)[0]))


def test_a_mismatching_checkpoint_is_refused_by_name(tmp_path, fresh):
  source, target, shardings = fresh
  broken = jax.device_get(source)
  broken["seg_head"]["fc1"]["kernel"] = np.zeros((3, 3), np.float32)
  checkpoint_io.save_params(str(tmp_path / "a"), broken)
  with pytest.raises(ValueError, match="seg_head/fc1/kernel"):
    loop.load_initial_params(str(tmp_path / "a"), target, shardings)
  extra = dict(jax.device_get(source), unexpected={"w": np.zeros(2, np.float32)})
  checkpoint_io.save_params(str(tmp_path / "b"), extra)
  with pytest.raises(KeyError, match="unexpected/w"):
    loop.load_initial_params(str(tmp_path / "b"), target, shardings)
