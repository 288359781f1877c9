"""The decoder's attention: rotary positions, multi-axis projections, masked grouped-query attention, KV cache.

The padding and position conventions are those of `models/llm.py` (its docstring): a False `attention_mask` slot
is a key no query attends to, and positions count the real tokens before a slot.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from unires_jax.models.llm_config import LlamaConfig
from unires_jax.models.splash_attention import attend_splash
from unires_jax.sharding import with_logical_constraint, logical_init

Dtype = Any


def default_positions(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """Rotary positions = real tokens before each slot (+ `offset` real tokens already cached). [B, L] int32."""
  counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1)  # [B, L]
  return jnp.maximum(counts - 1, 0) + jnp.asarray(offset, jnp.int32).reshape(-1, 1)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF LLaMA layout (the two halves of `head_dim` form the rotated pairs).

  x: [B, L, N, Dh]; positions: [B, L]. Angles are computed in float32.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, Dh]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated_half = jnp.concatenate([-second, first], axis=-1)
  out = x.astype(jnp.float32) * jnp.cos(angles) + rotated_half * jnp.sin(angles)
  return out.astype(x.dtype)


class Projection(nn.Module):
  """A bias-free multi-axis linear map `einsum(equation, x, kernel)` with a `kernel` of `shape`.

  Written out (instead of `nn.DenseGeneral`) so the kernel is created in its final shape: DenseGeneral initialises
  a flattened kernel, whose logical names then do not match its rank under a mesh.
  """
  equation: str
  shape: tuple[int, ...]
  names: tuple[str, ...]
  fan_in_axes: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # > 1: x's last `merged_in` axes (the kernel's first) are contracted as one flat axis, a plain matmul. For o_proj
  # in decoding, the einsum form let XLA:CPU transpose the whole [H, Dh, D] kernel at every token.
  merged_in: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_out_axes = tuple(a for a in range(len(self.shape)) if a not in self.fan_in_axes)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=self.fan_in_axes,
                                            out_axis=fan_out_axes)
    kernel = self.param("kernel", logical_init(init, self.names), self.shape, self.param_dtype)
    if self.merged_in > 1:
      flat_x = x.reshape(*x.shape[:-self.merged_in], -1)  # [..., F]
      flat_kernel = kernel.reshape(-1, *kernel.shape[self.merged_in:])  # [F, ...]
      return jnp.tensordot(flat_x.astype(self.dtype), flat_kernel.astype(self.dtype), axes=1)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


def attend(query: jax.Array, key: jax.Array, value: jax.Array, allowed: jax.Array, impl: str,
           dtype: Dtype) -> jax.Array:
  """Masked grouped-query attention: query [B, L, H, Dh], key/value [B, S, KVH, Dh], allowed [B, L, S] → [B, L, H, Dh].

  A fully masked row (a query on leading padding) attends uniformly to every key instead of producing NaN, in every
  implementation (finite fill before the softmax).
  """
  kv_heads, head_dim = key.shape[2], key.shape[3]
  if impl == "einsum":
    grouped = rearrange(query, "b l (k g) d -> b l k g d", k=kv_heads)
    scores = jnp.einsum("blkgd,bskd->bkgls", grouped, key, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, KVH, G, L, S]
    attended = jnp.einsum("bkgls,bskd->blkgd", probs, value.astype(dtype))
    return rearrange(attended, "b l k g d -> b l (k g) d")
  return jax.nn.dot_product_attention(query.astype(dtype), key.astype(dtype), value.astype(dtype),
                                      mask=allowed[:, None], implementation=impl)  # mask [B, 1, L, S]


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions and an optional KV cache (collection 'cache')."""
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _project(self, equation: str, shape: tuple[int, ...], names: tuple[str, ...], fan_in_axes: tuple[int, ...],
               name: str, merged_in: int = 0) -> "Projection":
    return Projection(equation, shape, names, fan_in_axes, dtype=self.dtype, param_dtype=self.param_dtype,
                      merged_in=merged_in, name=name)

  def _update_cache(self, key: jax.Array, value: jax.Array, attention_mask: jax.Array):
    """Writes this call's keys/values/mask at the next free slots; returns the whole cache and the first slot."""
    cfg = self.config
    batch, length = attention_mask.shape
    initialized = self.has_variable("cache", "cached_key")
    cache_shape = (batch, cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, cache_shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, cache_shape, value.dtype)
    cached_mask = self.variable("cache", "cache_mask", jnp.zeros, (batch, cfg.max_seq_len), jnp.bool_)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      # `init` only creates the (empty) cache; attention then runs over this call's tokens alone.
      return key, value, attention_mask, jnp.zeros((), jnp.int32)
    start = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                                    (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype),
                                                      (0, start, 0, 0))
    cached_mask.value = jax.lax.dynamic_update_slice(cached_mask.value, attention_mask, (0, start))
    cache_index.value = start + length
    return cached_key.value, cached_value.value, cached_mask.value, start

  @nn.compact
  def __call__(self, hidden: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               decode: bool = False) -> jax.Array:
    cfg = self.config
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    embed, in_heads = cfg.hidden_size, "bld,dnk->blnk"
    query = self._project(in_heads, (embed, heads, head_dim), ("embed", "heads", "head_dim"), (0,),
                          "q_proj")(hidden)  # [B, L, H, Dh]
    key = self._project(in_heads, (embed, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), (0,),
                        "k_proj")(hidden)  # [B, L, KVH, Dh]
    value = self._project(in_heads, (embed, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), (0,),
                          "v_proj")(hidden)
    query = with_logical_constraint(query, ("activation_batch", "activation_length", "activation_heads", None))
    key = with_logical_constraint(key, ("activation_batch", "activation_length", "activation_kv_heads", None))
    value = with_logical_constraint(value, ("activation_batch", "activation_length", "activation_kv_heads", None))
    query = apply_rotary(query, positions, cfg.rope_theta)
    key = apply_rotary(key, positions, cfg.rope_theta)

    length = hidden.shape[1]
    if decode:
      key, value, key_mask, start = self._update_cache(key, value, attention_mask)  # keys [B, S, KVH, Dh]
    else:
      key_mask, start = attention_mask, jnp.zeros((), jnp.int32)
    query_slots = start + jnp.arange(length)  # [L]
    key_slots = jnp.arange(key.shape[1])  # [S]
    allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]  # [B, L, S]

    if cfg.attention_impl == "splash" and not decode:
      attended = attend_splash(query, key, value, key_mask, self.dtype)  # [B, L, H, Dh]
    else:
      impl = "xla" if cfg.attention_impl == "splash" else cfg.attention_impl
      attended = attend(query, key, value, allowed, impl, self.dtype)  # [B, L, H, Dh]
    attended = with_logical_constraint(attended, ("activation_batch", "activation_length", "activation_heads", None))
    return self._project("blnk,nkd->bld", (heads, head_dim, embed), ("heads", "head_dim", "embed"), (0, 1),
                         "o_proj", merged_in=2)(attended)
