"""The PyTorch UniRES against the JAX model: the exported checkpoint gives the same logits and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from configs import tiny  # noqa: E402
from scripts import convert_to_pytorch  # noqa: E402
from unires_jax.convert import torch_model  # noqa: E402
from unires_jax.convert import mapping  # noqa: E402
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
  convert_to_pytorch.convert_to_pytorch(params, config, str(out))
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
