"""The whole-model table and import_pretrained: bit-exact round trips, every parameter claimed, strict refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import tiny
from scripts import convert_to_pytorch
from unires_jax.convert import checkpoints, mapping, pretrained
from unires_jax.convert import unires as convert_unires
from unires_jax.convert.clip_vit import export_clip_vit
from unires_jax.convert.convnext import export_convnext_timm
from unires_jax.convert.llama import export_llama
from unires_jax.convert.sam import POSITIONAL, TIED_POSITIONAL, export_sam_decoder
from unires_jax.models.unires import UniRESConfig


def random_params(config, seed: int = 0) -> dict:
  """Random values in the model's exact param shapes (from `jax.eval_shape`, nothing compiled): norm scales near
  one, everything else small and non-zero, so every tensor matters."""
  cfg = UniRESConfig.from_config(config.model)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in sorted(convert_unires.param_shapes(cfg).items()):
    noise = rng.normal(0.0, 0.05, shape).astype(np.float32)
    flat[path] = noise + 1.0 if path.endswith("/scale") else noise
  return mapping.unflatten_params(flat)


@pytest.fixture(scope="module")
def config():
  return tiny.get_config()


@pytest.fixture(scope="module")
def params(config):
  return random_params(config)


@pytest.fixture(scope="module")
def cfg(config):
  return UniRESConfig.from_config(config.model)


def _flat(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in mapping.flatten_params(tree).items()}


def test_table_claims_every_parameter_once(cfg):
  shapes = convert_unires.param_shapes(cfg)
  paths = [e.jax_path for part in convert_unires.unires_parts(cfg) for e in part.entries]
  assert len(paths) == len(set(paths))
  assert set(paths) == set(shapes)
  names = [n for part in convert_unires.unires_parts(cfg) for e in part.entries for n in e.torch_names]
  assert len(names) == len(set(names))


def test_export_import_round_trip_is_bit_exact(params, cfg):
  state_dict = convert_unires.export_unires(params, cfg)
  assert state_dict["dynamic_query.q_proj.weight"].shape == (32, 32)
  # The Flax [D, H, Dh] query kernel flattens head-major into torch's [H*Dh, D].
  np.testing.assert_array_equal(state_dict["dynamic_query.q_proj.weight"][8:16],
                                params["dynamic_query"]["query"]["kernel"][:, 1, :].T)
  np.testing.assert_array_equal(state_dict["dense_neck.conv2.weight"][:, :, 0, 2],
                                params["dense_neck"]["conv2"]["kernel"][0, 2].T)
  back = convert_unires.import_unires(state_dict, cfg)
  want, got = _flat(params), _flat(back)
  assert set(want) == set(got)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_import_refuses_wrong_shape_and_unknown_tensor(params, cfg):
  state_dict = convert_unires.export_unires(params, cfg)
  bad = dict(state_dict, **{"seg_head.fc2.weight": np.zeros((16, 64), np.float32)})
  with pytest.raises(ValueError, match=r"seg_head\.fc2\.weight"):
    convert_unires.import_unires(bad, cfg)
  with pytest.raises(KeyError, match=r"seg_head\.extra"):
    convert_unires.import_unires(dict(state_dict, **{"seg_head.extra": np.zeros(1)}), cfg)
  missing = {k: v for k, v in state_dict.items() if k != "vision_flow.granularity_embedding"}
  with pytest.raises(KeyError, match=r"vision_flow\.granularity_embedding"):
    convert_unires.import_unires(missing, cfg)


def _write_pretrained_parts(params, cfg, directory) -> dict[str, str]:
  """The tiny model's parts in their upstream layouts: HF LLaMA, HF CLIP, open_clip ConvNeXt, HF SAM."""
  paths = {}
  llm = export_llama(params["llm"], cfg.llm)
  clip = export_clip_vit(params["vision_low"], cfg.vit)
  clip["text_model.embeddings.token_embedding.weight"] = np.ones((8, 4), np.float32)  # a full CLIPModel file
  convnext = export_convnext_timm(params["vision_high"], cfg.convnext, prefix="visual.trunk.")
  convnext["visual.trunk.head.fc.weight"] = np.ones((3, 128), np.float32)
  sam = export_sam_decoder(params["mask_decoder"], cfg.mask_decoder)
  del sam[POSITIONAL]  # SamModel checkpoints may hold only the tied copy
  assert TIED_POSITIONAL in sam
  sam["vision_encoder.neck.conv1.weight"] = np.ones((2, 2), np.float32)
  for name, state_dict in (("llm", llm), ("vision_tower", clip), ("convnext", convnext), ("sam", sam)):
    os.makedirs(os.path.join(directory, name))
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(directory, name, "model.safetensors"))
    paths[name] = os.path.join(directory, name)
  return paths


def test_import_pretrained_then_export_reproduces_every_tensor(params, cfg, config, tmp_path):
  sources = _write_pretrained_parts(params, cfg, tmp_path / "pretrained")
  report = pretrained.import_pretrained(config, str(tmp_path / "init"), sources, seed=3)
  imported, _ = checkpoints.load_params(str(tmp_path / "init"))
  want, got = _flat(params), _flat(imported)
  assert set(got) == set(want)
  fresh = {row["param"] for row in report["initialised"]}
  assert fresh == {p for p in want if p.split("/")[0] in ("vision_flow", "seg_head", "visual_key_proj",
                                                           "dynamic_query", "dense_neck")}
  for path in want:
    if path not in fresh:
      np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  # Fresh parameters follow the initialisers: zero biases, unit norm scales, non-zero random kernels.
  np.testing.assert_array_equal(got["seg_head/fc1/bias"], 0.0)
  np.testing.assert_array_equal(got["dense_neck/norm1/scale"], 1.0)
  assert np.std(got["seg_head/fc1/kernel"]) > 0.01
  assert report["num_imported_tensors"] + report["num_initialised_tensors"] == len(want)
  with open(tmp_path / "init" / "import_report.json") as f:
    assert json.load(f)["imported"][0]["param"] == "llm/embed_tokens/embedding"

  # Export the imported checkpoint: the parts that came in go out bit for bit.
  out = tmp_path / "export"
  convert_to_pytorch.main(["--checkpoint", str(tmp_path / "init"), "--out", str(out)])
  llm_back = load_file(out / "llm" / "model.safetensors")
  for name, value in load_file(os.path.join(sources["llm"], "model.safetensors")).items():
    np.testing.assert_array_equal(llm_back[name], value, err_msg=name)
  tower_back = load_file(out / "vision_tower" / "model.safetensors")
  for name, value in load_file(os.path.join(sources["vision_tower"], "model.safetensors")).items():
    if name.startswith("vision_model."):
      np.testing.assert_array_equal(tower_back[name], value, err_msg=name)
  heads = load_file(out / "unires.safetensors")
  state_dict = convert_unires.export_unires(imported, cfg)
  for name, value in heads.items():
    np.testing.assert_array_equal(value, state_dict[name], err_msg=name)
  assert {n for n in state_dict if not n.startswith(("llm.", "vision_tower."))} == set(heads)


def test_import_pretrained_refuses_wrong_size_naming_the_tensor(params, cfg, config, tmp_path):
  llm = export_llama(params["llm"], cfg.llm)
  llm["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
  os.makedirs(tmp_path / "llm")
  save_file(llm, str(tmp_path / "llm" / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight' in .*llm/model\.safetensors "
                                       r"has shape \(96, 64\), expected \(128, 64\)"):
    pretrained.import_pretrained(config, str(tmp_path / "out"), {"llm": str(tmp_path / "llm")})
  assert not os.path.exists(tmp_path / "out" / "params")


def test_import_pretrained_refuses_another_architecture(params, cfg, config, tmp_path):
  llm = export_llama(params["llm"], cfg.llm)
  llm["model.layers.2.input_layernorm.weight"] = np.ones(64, np.float32)  # a third layer the model lacks
  save_file(llm, str(tmp_path / "llm.safetensors"))
  with pytest.raises(KeyError, match=r"model\.layers\.2\.input_layernorm\.weight"):
    pretrained.import_pretrained(config, str(tmp_path / "out"), {"llm": str(tmp_path / "llm.safetensors")})
