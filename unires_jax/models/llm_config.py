"""`LlamaConfig`: the decoder's sizes and the names of its selectable kernels, checked when it is built."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

# Remat policies selectable by name in the config; 'none' disables rematerialisation.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Attention kernels selectable by config: "xla" and "cudnn" go through `jax.nn.dot_product_attention` (cuDNN's
# fused attention on GPU), "einsum" is the plain scores/softmax/values formulation kept as the reference, "splash"
# is Pallas' blockwise TPU kernel for full-sequence attention (`models/splash_attention.py`; decoding against the
# KV cache uses "xla").
ATTENTION_IMPLS = ("xla", "cudnn", "einsum", "splash")
# How `decode=True` calls run stacked (`scan_layers`) layers: "unstacked" is a Python loop over per-layer params
# (`with_decode_layers`), "scan" is the training path's `nn.scan` (it copies every layer's weights out of the stack
# at every decoded token on CPU, where XLA cannot read a slice in place).
DECODE_LAYERS = ("unstacked", "scan")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of the decoder; the keys of `configs/common.py::_llm`."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  scan_layers: bool = True
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"
  decode_layers: str = "unstacked"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads}) for grouped-query attention")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
    if not self.rope_theta > 0:
      raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"LlamaConfig.attention_impl {self.attention_impl!r} is unknown; expected one of "
                       f"{ATTENTION_IMPLS}")
    if self.decode_layers not in DECODE_LAYERS:
      raise ValueError(f"LlamaConfig.decode_layers {self.decode_layers!r} is unknown; expected one of "
                       f"{DECODE_LAYERS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat_policy {self.remat_policy!r} is unknown; expected one of "
                       f"{sorted(REMAT_POLICIES)}")

  @property
  def num_query_groups(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads
