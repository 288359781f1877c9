"""`Llama` against transformers' `LlamaForCausalLM`: imported logits match, export loads strictly, round trip exact."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unires_jax.convert import llama as convert  # noqa: E402
from unires_jax.models import llm  # noqa: E402

pytestmark = pytest.mark.torch

# Odd sizes and grouped-query attention: 6 query heads over 3 KV heads, head_dim 8, vocab 97.
CFG = llm.LlamaConfig(vocab_size=97, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8,
                      mlp_dim=72, rope_theta=1000.0, rms_norm_eps=1e-6, tie_embeddings=False, max_seq_len=32,
                      scan_layers=True, remat_policy="none")


@functools.cache
def _torch_model(cfg: llm.LlamaConfig, seed: int = 0):
  """A random tiny `LlamaForCausalLM`; weights drawn large enough that a wrong mapping changes the logits."""
  torch.manual_seed(seed)
  hf_config = transformers.LlamaConfig(**convert.llama_config_to_hf(cfg), attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      elif "embed_tokens" in name:
        param.normal_(0.0, 1.0)
      else:
        param.normal_(0.0, 1.0 / np.sqrt(param.shape[-1]))  # Linear weight [out, in]
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


def _jax_logits(cfg, params, ids, mask):
  model = llm.Llama(cfg)
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask),
                                                  method=llm.Llama.token_logits))(params))


def _torch_logits(model, ids, mask):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask.astype(np.int64)),
                position_ids=torch.as_tensor(positions, dtype=torch.long), use_cache=False)
  return out.logits.float().numpy()


@pytest.mark.parametrize("cfg", [
    CFG,
    dataclasses.replace(CFG, scan_layers=False),
    dataclasses.replace(CFG, tie_embeddings=True, num_kv_heads=1),
], ids=["scanned-gqa", "unrolled", "tied-mqa"])
def test_imported_logits_match_torch(cfg):
  torch_model = _torch_model(cfg)
  params = convert.import_llama(torch_model.state_dict(), cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, (3, 11)).astype(np.int32)
  mask = np.ones((3, 11), bool)
  mask[1, 7:] = False  # right padding; torch sees the same mask and positions
  want = _torch_logits(torch_model, ids, mask)
  got = _jax_logits(cfg, params, ids, mask)
  assert np.abs(want).max() > 1.0  # the weights are large enough for the comparison to mean something
  assert np.abs(got[mask] - want[mask]).max() < 1e-4


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, scan_layers=False),
                                 dataclasses.replace(CFG, tie_embeddings=True)],
                         ids=["scanned", "unrolled", "tied"])
def test_export_loads_strictly_and_round_trip_is_bit_exact(cfg):
  torch_model = _torch_model(cfg)
  original = _state_dict(torch_model)
  params = convert.import_llama(original, cfg)
  exported = convert.export_llama(params, cfg)
  assert set(exported) == set(original)
  for name, tensor in original.items():
    assert exported[name].dtype == tensor.dtype
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)

  fresh = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**convert.llama_config_to_hf(cfg), attn_implementation="eager")).eval()
  result = fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  ids = np.arange(10, dtype=np.int32)[None] % cfg.vocab_size
  mask = np.ones_like(ids, bool)
  np.testing.assert_array_equal(_torch_logits(fresh, ids, mask), _torch_logits(torch_model, ids, mask))


def test_export_of_jax_initialised_params_matches_jax_logits():
  """The other direction: params made in JAX, exported, give the same logits in torch."""
  model = llm.Llama(CFG)
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  params = jax.jit(lambda r: model.init(r, jnp.asarray(ids), jnp.asarray(mask),
                                        method=llm.Llama.token_logits))(jax.random.key(3))["params"]
  torch_model = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**convert.llama_config_to_hf(CFG), attn_implementation="eager")).eval()
  exported = convert.export_llama(params, CFG)
  torch_model.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
  got = _jax_logits(CFG, jax.tree.map(np.asarray, nn.meta.unbox(params)), ids, mask)
  assert np.abs(got - _torch_logits(torch_model, ids, mask)).max() < 1e-4


@pytest.mark.parametrize("change, tensor", [
    (dict(vocab_size=98), "model.embed_tokens.weight"),
    (dict(mlp_dim=64), "model.layers.0.mlp.gate_proj.weight"),
    (dict(num_kv_heads=2), "model.layers.0.self_attn.k_proj.weight"),
])
def test_wrong_size_checkpoint_is_refused_naming_the_tensor(change, tensor):
  state_dict = _state_dict(_torch_model(CFG))
  with pytest.raises(ValueError, match=tensor.replace(".", r"\.")):
    convert.import_llama(state_dict, dataclasses.replace(CFG, **change))


def test_missing_and_extra_tensors_are_named():
  state_dict = _state_dict(_torch_model(CFG))
  with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    convert.import_llama({k: v for k, v in state_dict.items() if k != "model.layers.1.mlp.up_proj.weight"}, CFG)
  with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
    convert.import_llama({**state_dict, "model.layers.2.mlp.up_proj.weight": np.zeros((72, 48))}, CFG)


def test_config_translation_round_trips_through_transformers():
  for cfg in (CFG, dataclasses.replace(CFG, tie_embeddings=True, num_kv_heads=6)):
    hf_dict = transformers.LlamaConfig(**convert.llama_config_to_hf(cfg)).to_dict()
    assert convert.hf_to_llama_config(hf_dict, scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is unsupported"),
    (dict(attention_bias=True), "attention_bias=True is unsupported"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'linear'"),
])
def test_unsupported_hf_variants_are_refused(change, message):
  hf_dict = {**convert.llama_config_to_hf(CFG), **change}
  with pytest.raises(ValueError, match=message):
    convert.hf_to_llama_config(hf_dict)
