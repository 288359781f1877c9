"""The assembled UniRES model: sharded == single device, frozen groups, bad input, the 7B config's shapes."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from configs import common, tiny, unires_7b
from unires_jax import sharding
from unires_jax.models import losses
from unires_jax.models.example_batch import example_batch
from unires_jax.models.unires import UniRESConfig, insert_visual_tokens, slot_attention_mask
from unires_jax.train import partition, state as state_lib, step as step_lib

WEIGHTS = dict(ce=1.0, bce=2.0, dice=0.5)


@pytest.fixture(scope="module")
def setup():
  config = tiny.get_config()
  model = state_lib.build_model(config.model)
  batch = example_batch(model.config, batch_size=8, seed=1)
  one_device = sharding.make_mesh(common.mesh_config(), devices=jax.devices()[:1])
  state, _ = state_lib.create_sharded_state(model, batch, one_device, sharding.rules_from_config(config.sharding_rules),
                                            jax.random.key(0))
  return config, model, batch, state.params


def _loss_and_grads(model, params, batch):
  def loss_fn(p):
    return losses.total_loss(model.apply({"params": p}, batch), batch, WEIGHTS)[0]
  return jax.value_and_grad(loss_fn)(params)


def test_sharded_forward_and_grad_equal_single_device(setup):
  """One mesh with every axis split (data 2, fsdp 2, tensor 2): one compile covers FSDP and tensor parallelism."""
  config, model, batch, params = setup
  single_out = jax.jit(model.apply)({"params": params}, batch)
  single_loss, single_grads = jax.jit(lambda p: _loss_and_grads(model, p, batch))(params)

  mesh = sharding.make_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_from_config(config.sharding_rules)
  sharded_params, shardings = state_lib.create_sharded_state(model, batch, mesh, rules, jax.random.key(0))
  sharded_params = sharded_params.params
  # Same initialisation whatever the mesh.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, sharded_params)
  batch_sh = state_lib.batch_shardings(batch, mesh)
  global_batch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(model.apply)({"params": sharded_params}, global_batch)
    loss, grads = jax.jit(lambda p, b: _loss_and_grads(model, p, b))(sharded_params, global_batch)
  for key in ("logits", "mask_logits", "iou_pred"):
    np.testing.assert_allclose(np.asarray(out[key]), np.asarray(single_out[key]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4),
               grads, single_grads)

  # Parameters really are sharded as the rules say, over each of the two model axes.
  llm = sharded_params["llm"]
  flat = {partition.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(sharded_params)[0]}
  for axis in ("fsdp", "tensor"):
    sharded_names = [k for k, x in flat.items() if isinstance(x.sharding, NamedSharding)
                     and any(axis in (s if isinstance(s, tuple) else (s,)) for s in x.sharding.spec if s)]
    assert sharded_names, f"no parameter is sharded over {axis}"
  embed = jax.tree.leaves(llm["embed_tokens"])[0]
  assert {"fsdp", "tensor"} <= set(jax.tree.leaves(tuple(embed.sharding.spec))), embed.sharding.spec
  # A sharded parameter's local shard is smaller than the global array.
  assert embed.addressable_shards[0].data.size < embed.size


def _jitted_grads(model, params, mask, batch):
  """`step.grads_for` under one `jit` (run op by op, the tiny model's backward pass took minutes of dispatch)."""
  return jax.jit(lambda p, b: step_lib.grads_for(model, p, mask, b, WEIGHTS))(params, batch)


def _inert(model, params):
  return partition.matching_patterns(params, model.config.inert_parameter_patterns())


def test_frozen_groups_get_no_gradient(setup):
  config, model, batch, params = setup
  frozen_patterns = ("vision_low/.*", "vision_high/.*") + _inert(model, params)
  mask = partition.trainable_mask(params, trainable=[".*"], frozen=frozen_patterns)
  grads = _jitted_grads(model, params, mask, batch)
  flat_grads = {partition.param_path(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  flat_params = {partition.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  frozen = [k for k in flat_params if k.startswith(("vision_low/", "vision_high/"))]
  assert frozen and not any(k in flat_grads for k in frozen)
  trainable = [partition.param_path(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m]
  assert set(flat_grads) == set(trainable)
  zero = [k for k in trainable if not np.any(np.asarray(flat_grads[k]))]
  assert not zero, f"trainable parameters without gradient: {zero}"


def test_every_parameter_but_the_inert_ones_gets_a_gradient(setup):
  """With nothing frozen, the parameters without gradient are exactly among the declared inert ones."""
  config, model, batch, params = setup
  grads = _jitted_grads(model, params, partition.trainable_mask(params), batch)
  zero = [partition.param_path(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
          if not np.any(np.asarray(g))]
  inert = _inert(model, params)
  assert zero, "the tiny model has unused parameters (SAM's multimask heads); the check would be vacuous"
  unexplained = [k for k in zero if not any(re.match(p, k) for p in inert)]
  assert not unexplained, f"parameters without gradient: {unexplained}"
  # Key biases are inert by symmetry: their gradient is round-off, not signal.
  key_bias = [partition.param_path(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
              if partition.param_path(p).endswith("key/bias")]
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if partition.param_path(path) in key_bias:
      assert float(np.max(np.abs(np.asarray(g)))) < 1e-6


def test_visual_tokens_land_in_their_slots():
  text = jnp.zeros((1, 6, 2))
  token_type = jnp.array([[0, 1, 1, 0, 2, 0]])
  image = jnp.array([[[1.0, 1.0], [2.0, 2.0]]])
  obj = jnp.array([[[7.0, 7.0]]])
  out = insert_visual_tokens(text, token_type, {1: image, 2: obj})
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 0, 7, 0])
  mask = slot_attention_mask(jnp.ones((1, 6), bool), token_type, {2: jnp.array([[False]])})
  np.testing.assert_array_equal(mask[0], [True, True, True, True, False, True])


def test_padded_boxes_do_not_change_the_output(setup):
  """Moving a padded (masked) box anywhere leaves every output unchanged."""
  config, model, batch, params = setup
  moved = dict(batch)
  boxes = batch["object_boxes"].copy()
  boxes[~batch["object_box_mask"]] = [1.0, 2.0, 30.0, 40.0]
  moved["object_boxes"] = boxes
  a = jax.jit(model.apply)({"params": params}, batch)
  b = jax.jit(model.apply)({"params": params}, moved)
  for key in a:
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-6)


def test_bad_inputs_fail_clearly(setup):
  config, model, batch, params = setup
  bad = dict(batch, image_high=np.zeros((8, 96, 96, 3), np.float32))
  with pytest.raises(ValueError, match="image_high"):
    model.apply({"params": params}, bad)
  too_many = example_batch(model.config, batch_size=2)
  too_many["object_boxes"] = np.zeros((2, 9, 4), np.float32)
  too_many["object_box_mask"] = np.ones((2, 9), bool)
  with pytest.raises(ValueError, match="maximum is 4"):
    model.apply({"params": params}, too_many)
  mesh = sharding.make_mesh(common.mesh_config(data=2, fsdp=4))
  with pytest.raises(ValueError, match="batch size 6"):
    sharding.check_batch_fits_mesh(6, mesh)
  cfg = tiny.get_config()
  cfg.model.llm.unlock() if hasattr(cfg.model.llm, "unlock") else None
  with pytest.raises(KeyError, match="num_layer"):
    d = cfg.model.to_dict()
    d["llm"]["num_layer"] = 3
    UniRESConfig.from_config(d)
  with pytest.raises(KeyError, match="colour"):
    UniRESConfig.from_config(dict(cfg.model.to_dict(), colour="red"))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(common.mesh_config(data=4, fsdp=4))


def test_7b_config_shapes_and_shardings_without_memory():
  config = unires_7b.get_config()
  model = state_lib.build_model(config.model)
  batch = state_lib.abstract_batch(config.model, batch_size=8, seq_len=1024)
  abstract = state_lib.abstract_train_state(model, batch)
  params = nn.meta.unbox(abstract.params)
  counts = {name: partition.count(sub) for name, sub in params.items()}
  llm = counts["llm"]
  assert 6.6e9 < llm < 7.0e9, counts  # LLaMA-7B: 6.74B (+ the special-token rows)
  assert 2.8e8 < counts["vision_low"] < 3.2e8, counts  # CLIP ViT-L/14: 303M
  assert 1.8e8 < counts["vision_high"] < 2.1e8, counts  # ConvNeXt-L: 196M
  mesh = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES)
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract.params), sharding.rules_from_config(config.sharding_rules))
  q_spec = jax.tree.leaves(specs["llm"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert any("fsdp" in jax.tree.leaves(tuple(s)) for s in q_spec)
  del mesh


def test_clip_to_sam_normalisation_matches_the_direct_formula():
  from unires_jax.data import transforms
  from unires_jax.models.unires import clip_to_sam_normalisation
  from unires_jax.pixel_stats import SAM_PIXEL_MEAN, SAM_PIXEL_STD
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
  clip = transforms.preprocess_image(image, 16)[None]  # [1, 16, 16, 3], rows 12.. are padding
  sam = np.asarray(clip_to_sam_normalisation(jnp.asarray(clip)))[0]
  resized = (clip[0] * np.asarray(transforms.CLIP_STD) + np.asarray(transforms.CLIP_MEAN)) * 255.0
  expected = (resized - np.asarray(SAM_PIXEL_MEAN)) / np.asarray(SAM_PIXEL_STD)
  np.testing.assert_allclose(sam[:12], expected[:12], atol=1e-4)
  assert np.all(sam[12:] == 0)


def test_input_batch_axes_come_from_the_rules_table():
  assert sharding.BATCH_AXES == sharding.batch_axes(sharding.DEFAULT_RULES) == ("data", "fsdp")
  sharding.check_batch_rule(sharding.DEFAULT_RULES)
  moved = tuple((name, "data" if name == "activation_batch" else target) for name, target in sharding.DEFAULT_RULES)
  assert sharding.batch_axes(moved) == ("data",)
  with pytest.raises(ValueError, match="activation_batch -> \\('data',\\), but input batches are split over"):
    sharding.check_batch_rule(moved)
  with pytest.raises(ValueError, match="no 'activation_batch' entry"):
    sharding.batch_axes([("embed", "fsdp")])
