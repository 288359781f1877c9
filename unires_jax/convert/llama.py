"""The `Llama` ↔ transformers `LlamaForCausalLM` parameter table and config translation.

Attention projections are 3-D in JAX (`q_proj` `[D, H, Dh]`, `o_proj` `[H, Dh, D]`) and 2-D `[out, in]` in
PyTorch; the head index is the slower one of PyTorch's flattened `H*Dh` axis. Scanned layers (`layers/...` with a
leading layer axis) and unrolled ones (`layers_{i}/...`) map to the same `model.layers.{i}.*` names.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.convert import mapping
from unires_jax.convert.common import tensor_to_numpy
from unires_jax.convert.hf_configs import llama_config_to_hf  # noqa: F401  (re-exported)
from unires_jax.models.llm import Llama, LlamaConfig

# Non-parameter buffers some transformers versions keep in the state dict.
_ALLOWED_UNUSED = (r"model\.rotary_emb\.inv_freq", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _heads_in_to_jax(num_heads: int):
  """torch [H*Dh, D] → JAX [D, H, Dh] (q/k/v projections)."""
  def convert(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T.reshape(w.shape[1], num_heads, w.shape[0] // num_heads))
  return convert


def _heads_in_to_torch(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def _heads_out_to_jax(num_heads: int):
  """torch [D, H*Dh] → JAX [H, Dh, D] (output projection)."""
  def convert(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T.reshape(num_heads, w.shape[1] // num_heads, w.shape[0]))
  return convert


def _heads_out_to_torch(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)


def _layer_entries(cfg: LlamaConfig, jax_prefix: str, torch_prefix: str, stacked: bool) -> list[mapping.Entry]:
  attn_j, attn_t = f"{jax_prefix}/self_attn", f"{torch_prefix}.self_attn"
  heads_in = [("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads), ("v_proj", cfg.num_kv_heads)]
  entries = mapping.norm(f"{jax_prefix}/input_layernorm", f"{torch_prefix}.input_layernorm", bias=False,
                         stacked=stacked)
  for name, heads in heads_in:
    entries.append(mapping.Entry.make(f"{attn_j}/{name}/kernel", f"{attn_t}.{name}.weight", _heads_in_to_jax(heads),
                                      _heads_in_to_torch, stacked))
  entries.append(mapping.Entry.make(f"{attn_j}/o_proj/kernel", f"{attn_t}.o_proj.weight",
                                    _heads_out_to_jax(cfg.num_heads), _heads_out_to_torch, stacked))
  entries += mapping.norm(f"{jax_prefix}/post_attention_layernorm", f"{torch_prefix}.post_attention_layernorm",
                          bias=False, stacked=stacked)
  for name in ("gate_proj", "up_proj", "down_proj"):
    entries += mapping.linear(f"{jax_prefix}/mlp/{name}", f"{torch_prefix}.mlp.{name}", bias=False,
                              stacked=stacked)
  return entries


def llama_table(cfg: LlamaConfig) -> list[mapping.Entry]:
  """The conversion table for `cfg` (scanned or unrolled layers; with or without an untied `lm_head`)."""
  entries = [mapping.Entry.make("embed_tokens/embedding", "model.embed_tokens.weight")]
  if cfg.scan_layers:
    entries += _layer_entries(cfg, "layers", "model.layers.{i}", stacked=True)
  else:
    for i in range(cfg.num_layers):
      entries += _layer_entries(cfg, f"layers_{i}", f"model.layers.{i}", stacked=False)
  entries += mapping.norm("norm", "model.norm", bias=False)
  if not cfg.tie_embeddings:
    entries += mapping.linear("lm_head", "lm_head", bias=False)
  return entries


def hf_to_llama_config(hf_config: Mapping[str, Any], scan_layers: bool = True,
                       remat_policy: str = "nothing_saveable") -> LlamaConfig:
  """A `transformers.LlamaConfig.to_dict()` (or `config.json`) → `LlamaConfig`; unsupported variants are refused."""
  def get(key, default=None):
    if key not in hf_config and default is None:
      raise KeyError(f"LLaMA config: key {key!r} is missing")
    value = hf_config.get(key, default)
    return default if value is None else value

  if get("hidden_act", "silu") != "silu":
    raise ValueError(f"LLaMA config: hidden_act {hf_config['hidden_act']!r} is unsupported; expected 'silu'")
  for key in ("attention_bias", "mlp_bias"):
    if hf_config.get(key):
      raise ValueError(f"LLaMA config: {key}=True is unsupported; the decoder has no biases")
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"LLaMA config: rope_type {rope_type!r} is unsupported; expected 'default'")
  rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
  num_heads = int(get("num_attention_heads"))
  hidden_size = int(get("hidden_size"))
  return LlamaConfig(
      vocab_size=int(get("vocab_size")), hidden_size=hidden_size, num_layers=int(get("num_hidden_layers")),
      num_heads=num_heads, num_kv_heads=int(get("num_key_value_heads", num_heads)),
      head_dim=int(get("head_dim", hidden_size // num_heads)), mlp_dim=int(get("intermediate_size")),
      rope_theta=float(rope_theta), rms_norm_eps=float(get("rms_norm_eps")),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      max_seq_len=int(get("max_position_embeddings", 2048)), scan_layers=scan_layers, remat_policy=remat_policy)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{path: shape}` of `Llama(cfg)`'s params, without materialising them."""
  model = Llama(cfg)
  ids = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda rng: model.init(rng, ids, jnp.ones((1, 1), jnp.bool_),
                                                   method=Llama.token_logits), jax.random.key(0))
  flat = mapping.flatten_params(nn.meta.unbox(abstract["params"]))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def import_llama(state_dict: Mapping[str, Any], cfg: LlamaConfig) -> dict:
  """`LlamaForCausalLM.state_dict()` (torch tensors or numpy) → `Llama(cfg)` params (nested dict of numpy).

  Strict: every tensor must be mapped and every shape must match `cfg`; the first mismatch is named. With tied
  embeddings `lm_head.weight` (transformers' alias of the embedding) may be present and is skipped.
  """
  arrays = {name: tensor_to_numpy(t) for name, t in state_dict.items()}
  allowed = _ALLOWED_UNUSED + ((r"lm_head\.weight",) if cfg.tie_embeddings else ())
  flat, _ = mapping.import_params(llama_table(cfg), arrays, num_layers=cfg.num_layers,
                                  expected=expected_shapes(cfg), what="LLaMA checkpoint", allow_unused=allowed)
  return mapping.unflatten_params(flat)


def export_llama(params: Mapping[str, Any], cfg: LlamaConfig) -> dict[str, np.ndarray]:
  """`Llama(cfg)` params (boxed or plain) → a `LlamaForCausalLM` state dict of numpy arrays.

  With tied embeddings `lm_head.weight` is written as a copy of the embedding, as `load_state_dict(strict=True)`
  of a tied transformers model expects it.
  """
  flat = {path: np.asarray(value) for path, value in mapping.flatten_params(nn.meta.unbox(params)).items()}
  state_dict = mapping.export_params(llama_table(cfg), flat)
  if cfg.tie_embeddings:
    state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"].copy()
  return state_dict
