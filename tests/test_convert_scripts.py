"""convert_to_pytorch.py on an Orbax training run: LoRA merged (or kept), tokenizer copied, config written, one
partial shard in memory at a time."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import tiny
from scripts import convert_to_pytorch
from unires_jax.convert import checkpoints, export, mapping
from unires_jax.convert import unires as convert_unires
from unires_jax.models.unires import UniRESConfig
from unires_jax.train import lora as lora_lib
from unires_jax.checkpointing import Checkpointer
from unires_jax.train.state import TrainState

LORA = dict(alpha=4.0, rank=2)
TARGET = "llm/layers/self_attn/q_proj/kernel"


def _random_params(cfg: UniRESConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  flat = {path: rng.normal(0.0, 0.05, shape).astype(np.float32)
          for path, shape in sorted(convert_unires.param_shapes(cfg).items())}
  return mapping.unflatten_params(flat)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir as the training loop leaves it: config.json and two Orbax steps of a TrainState with LoRA."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny.get_config()
  config.train = ml_collections.ConfigDict({"lora": dict(LORA, enabled=True)})
  cfg = UniRESConfig.from_config(config.model)
  params = _random_params(cfg)
  kernel = params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, D, H, Dh]
  rng = np.random.default_rng(1)
  lora = {TARGET.replace("/", "."): {
      "a": rng.normal(size=(kernel.shape[0], kernel.shape[1], LORA["rank"])).astype(np.float32),
      "b": rng.normal(size=(kernel.shape[0], LORA["rank"], kernel.shape[2] * kernel.shape[3])).astype(np.float32)}}
  (workdir / "config.json").write_text(config.to_json_best_effort())
  checkpointer = Checkpointer(str(workdir / "checkpoints"), save_every=1, async_save=False)
  for step, scale in ((10, 0.0), (20, 1.0)):  # the older step has different weights
    state_params = dict(jax_tree_scale(params, scale), lora=lora)
    checkpointer.save(step, TrainState(step=jnp.asarray(step), params=state_params, opt_state=None), None, force=True)
  checkpointer.close()
  tokenizer = workdir / "toy.model"
  tokenizer.write_bytes(b"sentencepiece model bytes")
  return workdir, config, params, lora, tokenizer


def jax_tree_scale(params, scale):
  return mapping.unflatten_params({k: v * scale + (1 - scale) for k, v in mapping.flatten_params(params).items()})


def test_workdir_export_merges_lora_of_the_newest_step(run, tmp_path):
  workdir, config, params, lora, tokenizer = run
  out = tmp_path / "out"
  convert_to_pytorch.main(["--workdir", str(workdir), "--out", str(out), "--tokenizer", str(tokenizer)])
  merged = lora_lib.merge_lora(dict(params, lora=lora), LORA["alpha"], LORA["rank"])
  q = np.asarray(merged["llm"]["layers"]["self_attn"]["q_proj"]["kernel"])
  # Hand check of the merge: kernel + alpha/rank · A @ B, reshaped to [D, H, Dh].
  delta = np.einsum("sir,sro->sio", lora[TARGET.replace("/", ".")]["a"], lora[TARGET.replace("/", ".")]["b"])
  base = params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(q, base + (LORA["alpha"] / LORA["rank"]) * delta.reshape(base.shape), rtol=0,
                             atol=1e-5)
  llm = load_file(out / "llm" / "model.safetensors")
  heads_in = q[1].reshape(q.shape[1], -1).T  # layer 1, torch [H*Dh, D]
  np.testing.assert_array_equal(llm["model.layers.1.self_attn.q_proj.weight"], heads_in)
  np.testing.assert_array_equal(llm["model.layers.0.mlp.up_proj.weight"],
                                params["llm"]["layers"]["mlp"]["up_proj"]["kernel"][0].T)
  assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
  assert (out / "llm" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
  exported = json.loads((out / "config.json").read_text())
  assert exported["model"] == config.model.to_dict()
  assert exported["export"]["lora"] == "merged"
  assert not (out / "lora.safetensors").exists()


def test_keep_lora_writes_the_factors_and_unmerged_weights(run, tmp_path):
  workdir, _, params, lora, _ = run
  out = tmp_path / "out"
  convert_to_pytorch.main(["--checkpoint", str(workdir / "checkpoints" / "20"), "--out", str(out), "--keep-lora"])
  factors = load_file(out / "lora.safetensors")
  key = TARGET.replace("/", ".")
  # PEFT's layout under the PyTorch Linear name, one pair per layer: lora_A [r, in], lora_B [out, r].
  for layer in range(lora[key]["a"].shape[0]):
    name = f"llm.model.layers.{layer}.self_attn.q_proj"
    if f"{name}.lora_A" not in factors:
      name = f"model.layers.{layer}.self_attn.q_proj"
    np.testing.assert_array_equal(factors[f"{name}.lora_A"], np.asarray(lora[key]["a"][layer]).T)
    np.testing.assert_array_equal(factors[f"{name}.lora_B"], np.asarray(lora[key]["b"][layer]).T)
  llm = load_file(out / "llm" / "model.safetensors")
  base = params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"][0]
  np.testing.assert_array_equal(llm["model.layers.0.self_attn.q_proj.weight"], base.reshape(base.shape[0], -1).T)


def test_older_step_and_missing_checkpoint(run, tmp_path):
  workdir, _, params, _, _ = run
  older, _ = checkpoints.load_params(str(workdir), step=10)
  np.testing.assert_array_equal(older["seg_head"]["fc1"]["bias"], np.ones_like(params["seg_head"]["fc1"]["bias"]))
  with pytest.raises(FileNotFoundError, match="step 30"):
    checkpoints.load_params(str(workdir), step=30)
  with pytest.raises(FileNotFoundError, match="neither a run workdir"):
    checkpoints.load_params(str(tmp_path))


def test_export_holds_one_partial_shard_at_a_time(tmp_path, monkeypatch):
  """The folders are written one after the other: no tensor is buffered while another folder's shard is open."""
  from unires_jax.convert import shards

  config = tiny.get_config()
  params = _random_params(UniRESConfig.from_config(config.model))
  open_buffers, most = set(), [0]
  add, close = shards.ShardWriter.add, shards.ShardWriter.close

  def tracked_add(self, name, array):
    add(self, name, array)
    open_buffers.add(id(self))
    most[0] = max(most[0], len(open_buffers))

  def tracked_close(self):
    open_buffers.discard(id(self))
    return close(self)

  monkeypatch.setattr(shards.ShardWriter, "add", tracked_add)
  monkeypatch.setattr(shards.ShardWriter, "close", tracked_close)
  summary = export.convert_to_pytorch(params, config, str(tmp_path / "out"), max_shard_bytes=20_000)
  assert most[0] == 1 and summary["num_llm_tensors"] > 0 and summary["num_head_tensors"] > 0


def test_parse_size_reads_units_and_plain_bytes():
  from unires_jax.convert import shards
  assert shards.parse_size("2GB") == 2_000_000_000 and shards.parse_size("1.5GiB") == 3 * 2 ** 29
  assert shards.parse_size("500mb") == 500_000_000 and shards.parse_size("1234") == 1234
