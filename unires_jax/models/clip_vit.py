"""CLIP's vision transformer (the low-resolution encoder E_l), numerically equal to HF `CLIPVisionModel`.

Features follow LLaVA: hidden state `select_layer` of the encoder (hidden_states[0] is the pre-LayerNorm'd
embedding output), class token dropped. Layers are stacked with `nn.scan` (params carry a leading `layers` axis),
so compile time does not grow with depth; the scan carries the selected hidden state along, which costs running
the layers after `select_layer` (one layer for the usual -2) but keeps one code path for every choice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.models.layers import logical_dense, logical_layer_norm
from unires_jax.models.vit_sizes import VitSizes
from unires_jax.sharding import with_logical_constraint, logical_init

Dtype = Any

HIDDEN = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class ClipVitConfig(VitSizes):
  """The `model.vit` section: `ClipVitConfig(**cfg.model.vit.to_dict())`; the sizes come first (`VitSizes`)."""
  select_layer: int = -2
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    self.check_vit_sizes()
    if not -(self.depth + 1) <= self.select_layer <= self.depth:
      raise ValueError(f"ClipVitConfig: select_layer {self.select_layer} must index the {self.depth + 1} hidden "
                       f"states (in [{-(self.depth + 1)}, {self.depth}])")

  @property
  def select_index(self) -> int:
    """`select_layer` as a non-negative index into the `depth + 1` hidden states."""
    return self.select_layer % (self.depth + 1)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation: x · sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] matrix of 1-D bicubic resampling, as torch `interpolate(mode='bicubic',
  align_corners=False)`: half-pixel centres, Keys kernel with a = -0.75, taps clamped at the borders.
  At out_size == in_size it is the identity."""

  def near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def far(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for out_index in range(out_size):
    source = (out_index + 0.5) * scale - 0.5
    base = int(np.floor(source))
    frac = source - base
    weights = (far(frac + 1), near(frac), near(1 - frac), far(2 - frac))
    for offset, weight in zip((-1, 0, 1, 2), weights):
      matrix[out_index, min(max(base + offset, 0), in_size - 1)] += weight
  return matrix.astype(np.float32)


def resize_position_grid(grid: jax.Array, height: int, width: int) -> jax.Array:
  """Patch position embeddings [g, g, D] → [height, width, D] by separable bicubic resampling (torch's)."""
  rows = jnp.asarray(bicubic_matrix(grid.shape[0], height))  # [height, g]
  cols = jnp.asarray(bicubic_matrix(grid.shape[1], width))   # [width, g]
  return jnp.einsum("oh,pw,hwd->opd", rows, cols, grid.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(grid.dtype)


class HeadsProjection(nn.Module):
  """[B, N, D] → [B, N, H, Dh] (`to_heads`) or [B, N, H, Dh] → [B, N, D]: a Dense whose kernel keeps the head
  axes, so they can be sharded. (Flax's DenseGeneral reshapes a flat boxed init, which a mesh context rejects.)"""
  num_heads: int
  head_dim: int
  width: int
  to_heads: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    heads = (self.num_heads, self.head_dim)
    if self.to_heads:
      kernel_shape, names, bias_shape = (self.width, *heads), ("embed", "heads", "head_dim"), heads
      init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
      equation, bias_names = "bnd,dhk->bnhk", ("heads", "head_dim")
    else:
      kernel_shape, names, bias_shape = (*heads, self.width), ("heads", "head_dim", "embed"), (self.width,)
      init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
      equation, bias_names = "bnhk,hkd->bnd", ("embed",)
    kernel = self.param("kernel", logical_init(init, names), kernel_shape, self.param_dtype)
    bias = self.param("bias", logical_init(nn.initializers.zeros, bias_names), bias_shape,
                      self.param_dtype)
    return jnp.einsum(equation, inputs.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class _ClipSublayer(nn.Module):
  """The fields of an encoder layer's attention and MLP: the config and the compute / parameter dtypes."""
  config: ClipVitConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


class ClipAttention(_ClipSublayer):
  """Multi-head self-attention with separate q/k/v projections (HF `CLIPAttention`)."""

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:  # [B, N, D]
    cfg = self.config
    projection = functools.partial(HeadsProjection, cfg.num_heads, cfg.head_dim, cfg.width, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
    query = projection(True, name="q_proj")(hidden)  # [B, N, H, Dh]
    key = projection(True, name="k_proj")(hidden)
    value = projection(True, name="v_proj")(hidden)
    query = with_logical_constraint(query, ("activation_batch", "activation_length", "activation_heads", None))
    logits = jnp.einsum("bqhd,bkhd->bhqk", query * (cfg.head_dim ** -0.5), key)  # [B, H, N, N]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)  # [B, N, H, Dh]
    return projection(False, name="out_proj")(attended)  # [B, N, D]


class ClipMlp(_ClipSublayer):
  """fc1 → quick-GELU → fc2."""

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:  # [B, N, D]
    cfg = self.config
    hidden = logical_dense(cfg.mlp_dim, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(hidden)
    hidden = with_logical_constraint(quick_gelu(hidden), ("activation_batch", "activation_length", "activation_mlp"))
    return logical_dense(cfg.width, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(hidden)


class ClipEncoderLayer(nn.Module):
  """One pre-norm block, in scan form: carry `(hidden, selected)`, input the 0-based layer number.

  `selected` becomes this layer's output when the layer produces hidden state `config.select_index`.
  """
  config: ClipVitConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, jax.Array], layer_number: jax.Array):
    hidden, selected = carry  # [B, N, D] each
    norm1 = logical_layer_norm("layer_norm1", self.config.layer_norm_eps, self.dtype, self.param_dtype)
    hidden = hidden + ClipAttention(self.config, self.dtype, self.param_dtype, name="self_attn")(norm1(hidden))
    norm2 = logical_layer_norm("layer_norm2", self.config.layer_norm_eps, self.dtype, self.param_dtype)
    hidden = hidden + ClipMlp(self.config, self.dtype, self.param_dtype, name="mlp")(norm2(hidden))
    hidden = with_logical_constraint(hidden, HIDDEN)
    selected = jnp.where(layer_number + 1 == self.config.select_index, hidden, selected)
    return (hidden, selected), None


class ClipVisionTransformer(nn.Module):
  """images [B, H, W, 3] → patch features [B, (H/p)·(W/p), width] from hidden state `select_layer`.

  Any H, W divisible by the patch size work; when the patch grid differs from the native
  `image_size / patch_size` grid, the patch position embeddings are resampled bicubically exactly as
  HF's `interpolate_pos_encoding=True` does (the class position embedding is kept).
  The final `post_layernorm` does not touch the features; it is kept so checkpoints round-trip and is applied
  to the last layer's class token, sown as `intermediates/pooled` (HF's `pooler_output`).
  """
  config: ClipVitConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"ClipVisionTransformer: expected images [B, H, W, 3], got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % cfg.patch_size or width % cfg.patch_size:
      raise ValueError(f"ClipVisionTransformer: image size {height}x{width} is not divisible by the patch size "
                       f"{cfg.patch_size}")
    grid_h, grid_w = height // cfg.patch_size, width // cfg.patch_size

    patches = nn.Conv(
        cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
        use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding",
        kernel_init=logical_init(nn.initializers.lecun_normal(),
                                                 (None, None, None, "embed")),
    )(images.astype(self.dtype))  # [B, gh, gw, D]
    patches = einops.rearrange(patches, "b h w d -> b (h w) d")  # [B, N, D]

    class_embedding = self.param("class_embedding", logical_init(
        nn.initializers.normal(cfg.width ** -0.5), ("embed",)), (cfg.width,), self.param_dtype)
    position_embedding = self.param("position_embedding", logical_init(
        nn.initializers.normal(0.02), (None, "embed")), (cfg.grid_size ** 2 + 1, cfg.width), self.param_dtype)
    patch_positions = position_embedding[1:]  # [g·g, D]
    if (grid_h, grid_w) != (cfg.grid_size, cfg.grid_size):
      grid = einops.rearrange(patch_positions, "(h w) d -> h w d", h=cfg.grid_size)
      patch_positions = einops.rearrange(resize_position_grid(grid, grid_h, grid_w), "h w d -> (h w) d")

    batch = images.shape[0]
    class_token = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.width))
    embeddings = jnp.concatenate([class_token, patches], axis=1)  # [B, 1 + N, D]
    positions = jnp.concatenate([position_embedding[:1], patch_positions], axis=0)  # [1 + N, D]
    embeddings = embeddings + positions.astype(self.dtype)[None]
    hidden = logical_layer_norm("pre_layrnorm", cfg.layer_norm_eps, self.dtype, self.param_dtype)(embeddings)
    hidden = with_logical_constraint(hidden, HIDDEN)

    layer = nn.remat(ClipEncoderLayer, prevent_cse=False) if self.remat else ClipEncoderLayer
    layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0,
                     length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})(
                         cfg, self.dtype, self.param_dtype, name="layers")
    (last, selected), _ = layers((hidden, hidden), jnp.arange(cfg.depth))

    post_layernorm = logical_layer_norm("post_layernorm", cfg.layer_norm_eps, self.dtype, self.param_dtype)
    pooled = post_layernorm(last[:, 0])  # [B, D]
    self.sow("intermediates", "pooled", pooled)
    return selected[:, 1:]  # [B, N, D]
