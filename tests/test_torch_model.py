"""The PyTorch UniRES against the JAX model: the exported checkpoint gives the same logits and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from configs import tiny  # noqa: E402
from unires_jax.convert import export, mapping  # noqa: E402
from unires_jax.convert import torch_model  # noqa: E402
from unires_jax.convert import unires as convert_unires  # noqa: E402
from unires_jax.models.example_batch import example_batch  # noqa: E402
from unires_jax.models.roi_align import roi_align as jax_roi_align  # noqa: E402
from unires_jax.models.unires import UniRES, UniRESConfig  # noqa: E402

pytestmark = pytest.mark.torch


# Larger weights after the LLM, so the mask logits are far from zero and the comparison means something.
MASK_SIDE = ("mask_decoder", "seg_head", "dense_neck", "dynamic_query", "visual_key_proj")


def _random_params(cfg: UniRESConfig, seed: int = 0) -> dict:
  """Random values in the model's param shapes: norm scales near one, other tensors small and non-zero."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in sorted(convert_unires.param_shapes(cfg).items()):
    std = 0.2 if path.split("/")[0] in MASK_SIDE else 0.05
    noise = rng.normal(0.0, std, shape).astype(np.float32)
    flat[path] = noise + 1.0 if path.endswith("/scale") else noise
  return mapping.unflatten_params(flat)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config = tiny.get_config()
  cfg = UniRESConfig.from_config(config.model)
  params = _random_params(cfg)
  batch = example_batch(cfg, 2, seed=1)
  jax_out = jax.jit(UniRES(cfg).apply)({"params": params}, {k: jnp.asarray(v) for k, v in batch.items()})
  out = tmp_path_factory.mktemp("export")
  export.convert_to_pytorch(params, config, str(out))
  return out, batch, {k: np.asarray(v) for k, v in jax_out.items()}


def test_exported_forward_matches_jax(exported):
  out, batch, want = exported
  model = torch_model.UniRESTorch.from_exported(str(out))
  with torch.no_grad():
    got = model({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})
  for key in ("logits", "mask_logits", "iou_pred"):
    assert got[key].shape == want[key].shape, key
    assert np.abs(want[key]).max() > 0.05, key  # a comparison of non-trivial outputs
    np.testing.assert_allclose(got[key].numpy(), want[key], atol=1e-4, rtol=0, err_msg=key)
  # The padded slots and the [SEG] prompt matter: another seg position changes the mask.
  moved = dict(batch, seg_index=np.maximum(batch["seg_index"] - 1, 0))
  with torch.no_grad():
    other = model({k: torch.from_numpy(np.asarray(v)) for k, v in moved.items()})
  assert np.abs(other["mask_logits"].numpy() - want["mask_logits"]).max() > 1e-3


def test_exported_parts_load_with_from_pretrained(exported):
  from safetensors.numpy import load_file
  from transformers import CLIPVisionModel, LlamaForCausalLM

  out, _, _ = exported
  llm = LlamaForCausalLM.from_pretrained(str(out / "llm"))
  on_disk = load_file(out / "llm" / "model.safetensors")
  for name, value in llm.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), on_disk[name], err_msg=name)
  tower = CLIPVisionModel.from_pretrained(str(out / "vision_tower"))
  on_disk = load_file(out / "vision_tower" / "model.safetensors")
  for name, value in tower.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), on_disk["vision_model." + name], err_msg=name)


def test_roi_align_matches_jax():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  # Boxes inside, across the border, degenerate, and fully outside the 36×44 canvas (no sample lands exactly on
  # the border, where float32 rounding would decide inside vs outside differently in the two frameworks).
  boxes = np.array([[[1.0, 2.0, 30.0, 20.0], [-10.2, -6.3, 8.3, 49.1], [5.0, 5.0, 5.0, 5.0],
                     [40.0, 30.0, 60.0, 70.0]]] * 2, np.float32)
  boxes[1] += rng.uniform(-3, 3, size=boxes[1].shape).astype(np.float32)
  for aligned in (True, False):
    want = np.asarray(jax_roi_align(jnp.asarray(features), jnp.asarray(boxes), 3, 0.25, 2, aligned))
    got = torch_model.roi_align(torch.from_numpy(features), torch.from_numpy(boxes), 3, 0.25, 2, aligned).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.1


def _forward(model, batch):
  with torch.no_grad():
    return model({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})


def test_lisa_variant_export_matches_jax(tmp_path):
  """SAM ViT dense source, linear projector, no granularity embedding, no region slots, no dynamic query."""
  from configs import lisa

  config = lisa.get_config("tiny")
  cfg = UniRESConfig.from_config(config.model)
  params = _random_params(cfg, seed=2)
  batch = example_batch(cfg, 2, seed=3)
  want = jax.jit(UniRES(cfg).apply)({"params": params}, {k: jnp.asarray(v) for k, v in batch.items()})
  summary = export.convert_to_pytorch(params, config, str(tmp_path))
  assert summary["num_head_tensors"] > 0
  model = torch_model.UniRESTorch.from_exported(str(tmp_path))
  assert hasattr(model, "sam_vit") and not hasattr(model, "vision_high") and not hasattr(model, "dynamic_query")
  got = _forward(model, batch)
  for key in ("logits", "mask_logits", "iou_pred"):
    assert np.abs(np.asarray(want[key])).max() > 0.05, key
    np.testing.assert_allclose(got[key].numpy(), np.asarray(want[key]), atol=2e-4, rtol=0, err_msg=key)


def test_sharded_bfloat16_export_loads_and_matches_the_single_file_one(exported, tmp_path):
  import json

  out, batch, _ = exported
  config = tiny.get_config()
  cfg = UniRESConfig.from_config(config.model)
  params = _random_params(cfg)
  export.convert_to_pytorch(params, config, str(tmp_path), dtype="bfloat16", max_shard_bytes=40_000)
  for folder, prefix in (("llm", "model"), ("vision_tower", "model"), ("", "unires")):
    with open(tmp_path / folder / f"{prefix}.safetensors.index.json") as f:
      index = json.load(f)
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1 and all((tmp_path / folder / s).exists() for s in shard_files)
    assert shard_files[0] == f"{prefix}-00001-of-{len(shard_files):05d}.safetensors"
  single = torch_model.UniRESTorch.from_exported(str(out))
  sharded = torch_model.UniRESTorch.from_exported(str(tmp_path))
  assert sharded.seg_head.fc1.weight.dtype == torch.bfloat16
  want = {n: p.to(torch.bfloat16) for n, p in single.state_dict().items()}
  for name, value in sharded.state_dict().items():
    assert torch.equal(value, want[name]), name
  # The bf16 forward runs and stays near the float32 one.
  got, ref = _forward(sharded, batch), _forward(single, batch)
  assert np.abs(got["mask_logits"].numpy() - ref["mask_logits"].numpy()).max() < 0.1 * np.abs(
      ref["mask_logits"].numpy()).max()
  with pytest.raises(ValueError, match="dtype 'int8'"):
    export.convert_to_pytorch(params, config, str(tmp_path / "bad"), dtype="int8")


def test_kept_lora_factors_give_the_merged_model(tmp_path):
  from unires_jax.train import lora as lora_lib

  from configs import common

  config = tiny.get_config()
  config.train = common.train_config()
  cfg = UniRESConfig.from_config(config.model)
  params = _random_params(cfg, seed=4)
  lora_cfg = config.train.lora
  factors = lora_lib.init_lora(params, jax.random.key(5), [tuple(t) for t in lora_cfg.targets], int(lora_cfg.rank),
                               tuple(lora_cfg.stacked_prefixes))
  rng = np.random.default_rng(6)
  factors = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.2, x.shape).astype(np.float32), factors)
  with_lora = dict(params, lora=factors)
  batch = example_batch(cfg, 2, seed=7)
  export.convert_to_pytorch(with_lora, config, str(tmp_path / "merged"))
  export.convert_to_pytorch(with_lora, config, str(tmp_path / "kept"), keep_lora=True)
  export.convert_to_pytorch(params, config, str(tmp_path / "base"))
  kept = torch_model.UniRESTorch.from_exported(str(tmp_path / "kept"))
  assert isinstance(kept.llm.model.layers[0].self_attn.o_proj, torch_model.LoraLinear)
  merged = _forward(torch_model.UniRESTorch.from_exported(str(tmp_path / "merged")), batch)
  base = _forward(torch_model.UniRESTorch.from_exported(str(tmp_path / "base")), batch)
  got = _forward(kept, batch)
  np.testing.assert_allclose(got["logits"].numpy(), merged["logits"].numpy(), atol=1e-4, rtol=0)
  assert np.abs(got["logits"].numpy() - base["logits"].numpy()).max() > 1e-2  # the factors do something
