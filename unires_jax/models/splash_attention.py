"""Causal grouped-query attention through Pallas' splash-attention kernel (the TPU's blockwise flash attention).

`attention_impl="splash"` in `LlamaConfig` routes the decoder's full-sequence attention (training, prefill) here;
single-token decoding against the KV cache keeps `jax.nn.dot_product_attention`, where a kernel brings nothing.

The kernel takes a static per-head mask (here causal) and segment ids. Padding is expressed as segment ids: a real
token is segment 1 and a padded slot segment 0, so a real query never sees a padded key, which is exactly the
`attend` rule `causal & key_mask` for every real query. Padded queries are not defined by that rule (`attend` lets
them look at every key; here they see the padded keys before them); their outputs are padding that no loss or
answer reads, and the tests compare real tokens only.

On a TPU the kernel is compiled by Mosaic. On any other backend it runs in Pallas' interpret mode: the same
numerics at a fraction of the speed, which is what the CPU tests check.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

# Block edges tried from the largest. The kernel's key blocks must be multiples of 128 (the TPU's lane width), so a
# shorter sequence is padded up to one 128-block.
BLOCK_EDGES = (512, 256, 128)


def block_edge(length: int) -> int:
  """The block edge for a sequence of `length`: the largest of `BLOCK_EDGES` not above it (the smallest for a
  sequence shorter than all of them)."""
  return next((edge for edge in BLOCK_EDGES if length >= edge), BLOCK_EDGES[-1])


def attend_splash(query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array,
                  dtype) -> jax.Array:
  """Causal attention of query [B, L, H, Dh] over key/value [B, L, KVH, Dh] with key_mask [B, L] → [B, L, H, Dh].

  Same query and key slots (no cache offset). Real queries get `attend(..., allowed=causal & key_mask)`.
  """
  batch, length, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  group = heads // kv_heads
  edge = block_edge(length)
  padded = -(-length // edge) * edge
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  scale = 1.0 / math.sqrt(head_dim)  # the kernel does not scale its logits
  query = jnp.pad((query * scale).astype(dtype), pad)
  key, value = jnp.pad(key.astype(dtype), pad), jnp.pad(value.astype(dtype), pad)
  segments = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, padded - length)))  # [B, P]; padding → segment 0

  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded)) for _ in range(group)])
  blocks = splash.BlockSizes(block_q=edge, block_kv=edge, block_kv_compute=edge, block_q_dkv=edge,
                             block_kv_dkv=edge, block_kv_dkv_compute=edge, block_q_dq=edge, block_kv_dq=edge)
  kernel = splash.make_splash_mqa_single_device(mask, block_sizes=blocks,
                                                interpret=jax.default_backend() != "tpu")

  grouped = rearrange(query, "b p (k g) d -> b k g p d", k=kv_heads)  # [B, KVH, G, P, Dh]
  keys = rearrange(key, "b p k d -> b k p d")  # [B, KVH, P, Dh]
  values = rearrange(value, "b p k d -> b k p d")

  def one_kv_head(q, k, v, segment_ids):  # q [G, P, Dh]; k, v [P, Dh]
    return kernel(q, k, v, segment_ids=segment_ids)

  def one_row(q, k, v, segment):  # q [KVH, G, P, Dh]; k, v [KVH, P, Dh]; segment [P]
    segment_ids = splash.SegmentIds(q=segment, kv=segment)
    return jax.vmap(one_kv_head, in_axes=(0, 0, 0, None))(q, k, v, segment_ids)

  attended = jax.vmap(one_row)(grouped, keys, values, segments)  # [B, KVH, G, P, Dh]
  return rearrange(attended, "b k g p d -> b p (k g) d")[:, :length]
