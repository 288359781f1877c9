"""scripts/import_pretrained.py before and while reading weights: config overrides, transformers config.json
compared with the config before any tensor is read, both CLIP layouts, shapes checked before reshapes, and weight
files that are not torch checkpoints."""

from __future__ import annotations

import json
import os
import pickle

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import tiny
from scripts import import_pretrained
from test_convert_unires import random_params
from unires_jax import cli
from unires_jax.convert import checkpoints, part_configs, pretrained
from unires_jax.convert.clip_vit import export_clip_vit
from unires_jax.convert.hf_configs import (clip_vit_config_to_hf, convnext_config_to_hf, llama_config_to_hf,
                                           sam_decoder_config_to_hf)
from unires_jax.convert.llama import export_llama
from unires_jax.models.unires import UniRESConfig

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def config():
  return tiny.get_config()


@pytest.fixture(scope="module")
def cfg(config):
  return UniRESConfig.from_config(config.model)


def _part(directory, state_dict: dict | None, hf_config: dict, garbage: bool = False) -> str:
  os.makedirs(directory, exist_ok=True)
  if garbage:  # a weight file that cannot be read at all: the config check must come first
    (directory / "model.safetensors").write_bytes(b"not weights")
  else:
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(hf_config))
  return str(directory)


# --- --config.* overrides -----------------------------------------------------------------------------------------
def test_overrides_follow_the_types_of_the_config():
  config = ml_collections.ConfigDict(dict(a=dict(n=2, rate=0.5, name="x", sizes=(1, 2), flag=False)))
  cli.apply_config_overrides(config, ["--config.a.n=3", "--config.a.rate=1", "--config.a.name=tiny",
                                      "--config.a.sizes=[4,5,6]", "--config.a.flag=True"])
  assert config.a.to_dict() == dict(n=3, rate=1.0, name="tiny", sizes=(4, 5, 6), flag=True)
  with pytest.raises(ValueError, match="--config.a.bogus: the config has no key 'a.bogus'"):
    cli.apply_config_overrides(config, ["--config.a.bogus=1"])
  with pytest.raises(ValueError, match=r"--config.a.n=many: expected a int like the current value 3"):
    cli.apply_config_overrides(config, ["--config.a.n=many"])
  with pytest.raises(ValueError, match="unexpected argument '--llm2'"):
    cli.apply_config_overrides(config, ["--llm2"])


# --- config.json against the config, before any tensor --------------------------------------------------------------
def test_a_deeper_llm_is_refused_field_by_field_before_its_weights_are_read(cfg, tmp_path):
  hf = dict(llama_config_to_hf(cfg.llm), num_hidden_layers=3, intermediate_size=96, model_type="llama")
  llm = _part(tmp_path / "llm", None, hf, garbage=True)
  with pytest.raises(part_configs.PartConfigMismatch) as caught:
    import_pretrained.main(["--config", TINY, "--out", str(tmp_path / "out"), "--llm", llm])
  message = str(caught.value)
  assert "nothing was read" in message and f"--llm {llm}" in message
  assert "model.llm.num_layers is 2, the checkpoint has 3 (--config.model.llm.num_layers=3)" in message
  assert "model.llm.mlp_dim is 128, the checkpoint has 96 (--config.model.llm.mlp_dim=96)" in message
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("part, flag, hf_key, value, expected", [
    ("vision_tower", "--vision-tower", "hidden_size", 48, "model.vit.width is 32, the checkpoint has 48"),
    ("convnext", "--convnext", "depths", [1, 1, 3, 1], "model.convnext.depths is [1, 1, 1, 1], the checkpoint has "
                                                       "[1, 1, 3, 1] (--config.model.convnext.depths=(1,1,3,1))"),
    ("sam", "--sam", "num_hidden_layers", 3, "model.mask_decoder.depth is 2, the checkpoint has 3"),
])
def test_clip_convnext_and_sam_configs_are_translated_and_compared(cfg, tmp_path, part, flag, hf_key, value, expected):
  if part == "vision_tower":
    hf = dict(clip_vit_config_to_hf(cfg.vit), model_type="clip_vision_model", **{hf_key: value})
  elif part == "convnext":
    hf = dict(convnext_config_to_hf(cfg.convnext), model_type="convnext", **{hf_key: value})
  else:  # a SamModel folder: the decoder's fields sit in mask_decoder_config
    hf = dict(model_type="sam", mask_decoder_config=dict(sam_decoder_config_to_hf(cfg.mask_decoder), **{hf_key: value}))
  path = _part(tmp_path / part, None, hf, garbage=True)
  with pytest.raises(part_configs.PartConfigMismatch, match=expected.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    import_pretrained.main(["--config", TINY, "--out", str(tmp_path / "out"), flag, path])


def test_an_override_makes_the_config_fit_and_is_written(tmp_path):
  deeper = tiny.get_config()
  deeper.model.llm.num_layers = 3
  deeper_cfg = UniRESConfig.from_config(deeper.model)
  params = random_params(deeper)
  llm = _part(tmp_path / "llm", export_llama(params["llm"], deeper_cfg.llm),
              dict(llama_config_to_hf(deeper_cfg.llm), model_type="llama"))
  out = tmp_path / "out"
  import_pretrained.main(["--config", TINY, "--config.model.llm.num_layers=3", "--out", str(out), "--llm", llm])
  assert checkpoints.load_run_config(str(out)).model.llm.num_layers == 3
  imported, _ = checkpoints.load_params(str(out))
  np.testing.assert_array_equal(imported["llm"]["layers"]["mlp"]["up_proj"]["kernel"],
                                params["llm"]["layers"]["mlp"]["up_proj"]["kernel"])


# --- weights ------------------------------------------------------------------------------------------------------
def test_clip_towers_with_and_without_the_vision_model_prefix(config, cfg, tmp_path):
  params = random_params(config)
  for name, prefix in (("with_prefix", "vision_model."), ("transformers5", "")):
    tower = export_clip_vit(params["vision_low"], cfg.vit, prefix=prefix)
    path = _part(tmp_path / name, tower, dict(clip_vit_config_to_hf(cfg.vit), model_type="clip_vision_model"))
    report = pretrained.import_pretrained(config, str(tmp_path / f"out_{name}"), {"vision_tower": path})
    assert any(row["param"] == "vision_low/class_embedding" for row in report["imported"]), name
    imported, _ = checkpoints.load_params(str(tmp_path / f"out_{name}"))
    np.testing.assert_array_equal(imported["vision_low"]["class_embedding"], params["vision_low"]["class_embedding"])
  other = tmp_path / "other.safetensors"
  save_file({"visual.conv1.weight": np.zeros((2, 2), np.float32)}, str(other))
  with pytest.raises(KeyError, match=r"expected tensors under 'vision_model\.'.*found the prefixes \['visual\.'\]"):
    pretrained.import_pretrained(config, str(tmp_path / "out_other"), {"vision_tower": str(other)})


def test_a_head_tensor_of_the_wrong_size_is_named_before_the_reshape(config, cfg, tmp_path):
  tower = export_clip_vit(random_params(config)["vision_low"], cfg.vit)
  tower["vision_model.encoder.layers.1.self_attn.q_proj.weight"] = np.zeros((40, 48), np.float32)  # 1920 values
  path = tmp_path / "tower.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in tower.items()}, str(path))
  with pytest.raises(ValueError) as caught:
    pretrained.import_pretrained(config, str(tmp_path / "out"), {"vision_tower": str(path)})
  message = str(caught.value)
  assert "tensor 'vision_model.encoder.layers.1.self_attn.q_proj.weight'" in message and str(path) in message
  assert "has shape (40, 48), expected (32, 32)" in message and "cannot reshape" not in message


def test_a_plain_pickle_is_not_a_torch_checkpoint(config, tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / "pytorch_model.bin"
  path.write_bytes(pickle.dumps({"model.embed_tokens.weight": [[0.0]]}))
  with pytest.raises(ValueError, match=f"weights file {path} is not a torch checkpoint.*a plain Python pickle"):
    pretrained.import_pretrained(config, str(tmp_path / "out"), {"llm": str(path)})
