"""SAM's ViT image encoder (the optional dense-feature source of the mask decoder), equal to HF `SamVisionEncoder`.

Patch embedding + absolute positions, pre-norm blocks with windowed attention (global in `global_attn_indexes`)
and decomposed relative position terms, then the conv neck to `out_channels`. Windowed and global blocks have
differently sized relative tables, so the blocks are a Python loop (`layers_{i}`), not an `nn.scan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.models.layers import fan_in_uniform, logical_conv, logical_dense, logical_layer_norm
from unires_jax.models.vit_sizes import VitSizes
from unires_jax.sharding import logical_init, with_logical_constraint

Dtype = Any

HIDDEN = ("activation_batch", None, None, "activation_embed")  # [B, h, w, D]


@dataclasses.dataclass(frozen=True)
class SamVitConfig(VitSizes):
  """The `model.sam_vit` section: `SamVitConfig(**cfg.model.sam_vit.to_dict())`; the sizes come first (`VitSizes`)."""
  window_size: int
  global_attn_indexes: tuple[int, ...]
  out_channels: int
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
    self.check_vit_sizes()
    if self.window_size < 1:
      raise ValueError(f"SamVitConfig: window_size must be >= 1, got {self.window_size}")
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"SamVitConfig: global_attn_indexes {bad} are not block indexes of a depth-{self.depth} "
                       f"encoder")

  def block_window(self, index: int) -> int:
    """The attention window of block `index`; 0 means global attention over the whole grid."""
    return 0 if index in self.global_attn_indexes else self.window_size


# --- windows -------------------------------------------------------------------------------------------------------
def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """[B, H, W, C] → windows [B, nh·nw, window, window, C] (row-major window order) and the padded size.

  H and W are zero-padded at the bottom/right to multiples of `window`; the padding takes part in attention as
  SAM does (it is not masked).
  """
  _, height, width, _ = x.shape
  pad_h, pad_w = -height % window, -width % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  windows = einops.rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) wh ww c", wh=window, ww=window)
  return windows, (height + pad_h, width + pad_w)


def window_unpartition(windows: jax.Array, padded_size: tuple[int, int], size: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`: [B, nh·nw, window, window, C] → [B, H, W, C] with the padding cut off."""
  window = windows.shape[2]
  x = einops.rearrange(windows, "b (nh nw) wh ww c -> b (nh wh) (nw ww) c", nh=padded_size[0] // window,
                       nw=padded_size[1] // window)
  return x[:, :size[0], :size[1]]


# --- relative positions --------------------------------------------------------------------------------------------
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of torch `interpolate(mode='linear', align_corners=False)`: half-pixel centres,
  source positions below 0 clamped to 0, the right tap clamped at the border. Identity when the sizes agree."""
  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for out_index in range(out_size):
    source = max((out_index + 0.5) * scale - 0.5, 0.0)
    left = min(int(np.floor(source)), in_size - 1)
    right = min(left + 1, in_size - 1)
    frac = source - left
    matrix[out_index, left] += 1.0 - frac
    matrix[out_index, right] += frac
  return matrix.astype(np.float32)


def relative_position_index(q_size: int, k_size: int) -> np.ndarray:
  """[q_size, k_size] int rows of the (resized) relative table for each query/key offset, as SAM computes them:
  coordinates of the shorter side are stretched to the longer one (float32, truncated)."""
  q_scale = np.float32(max(k_size / q_size, 1.0))
  k_scale = np.float32(max(q_size / k_size, 1.0))
  q_coords = np.arange(q_size, dtype=np.float32)[:, None] * q_scale
  k_coords = np.arange(k_size, dtype=np.float32)[None, :] * k_scale
  coords = (q_coords - k_coords) + np.float32((k_size - 1) * max(q_size / k_size, 1.0))
  return coords.astype(np.int64)


def relative_positions(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """rel_pos [L, C] → per query/key pair [q_size, k_size, C]; the table is linearly resized to
  `2·max(q, k) - 1` rows first when its length differs (SAM's interpolation)."""
  rows = 2 * max(q_size, k_size) - 1
  selection = linear_resize_matrix(rel_pos.shape[0], rows)[relative_position_index(q_size, k_size)]  # [q, k, L]
  return jnp.einsum("qkl,lc->qkc", jnp.asarray(selection), rel_pos.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(rel_pos.dtype)


def decomposed_rel_pos(query: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                       key_size: tuple[int, int]) -> jax.Array:
  """MViTv2's decomposed relative position term added to attention logits.

  query [..., qh, qw, C] (unscaled); rel_pos_h [Lh, C]; rel_pos_w [Lw, C] → [..., qh, qw, kh, kw] with
  term[y, x, ky, kx] = q[y, x] · Rh[y, ky] + q[y, x] · Rw[x, kx].
  """
  q_h, q_w = query.shape[-3:-1]
  k_h, k_w = key_size
  table_h = relative_positions(q_h, k_h, rel_pos_h).astype(query.dtype)  # [qh, kh, C]
  table_w = relative_positions(q_w, k_w, rel_pos_w).astype(query.dtype)  # [qw, kw, C]
  rel_h = jnp.einsum("...yxc,ykc->...yxk", query, table_h)  # [..., qh, qw, kh]
  rel_w = jnp.einsum("...yxc,xkc->...yxk", query, table_w)  # [..., qh, qw, kw]
  return rel_h[..., :, None] + rel_w[..., None, :]


# --- modules ---------------------------------------------------------------------------------------------------------
class SamVitAttention(nn.Module):
  """Self-attention inside each window, with a fused q/k/v projection and decomposed relative positions.

  x [B, N, h, w, D] (N windows of h×w tokens; N = 1 for global attention) → [B, N, h, w, D].
  `table_size` is the side the relative tables are made for (the window, or the grid for global blocks).
  """
  config: SamVitConfig
  table_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    heads, head_dim, width = cfg.num_heads, cfg.head_dim, cfg.width
    qkv_kernel = self.param("qkv_kernel", logical_init(
        nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3)), ("embed", None, "heads", "head_dim")),
        (width, 3, heads, head_dim), self.param_dtype)
    qkv_bias = self.param("qkv_bias", logical_init(nn.initializers.zeros, (None, "heads", "head_dim")),
                          (3, heads, head_dim), self.param_dtype)
    proj_kernel = self.param("proj_kernel", logical_init(
        nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed")),
        (heads, head_dim, width), self.param_dtype)
    proj_bias = self.param("proj_bias", logical_init(nn.initializers.zeros, ("embed",)), (width,), self.param_dtype)
    rel_shape = (2 * self.table_size - 1, head_dim)
    rel_pos_h = self.param("rel_pos_h", logical_init(nn.initializers.zeros, (None, "head_dim")), rel_shape,
                           self.param_dtype)
    rel_pos_w = self.param("rel_pos_w", logical_init(nn.initializers.zeros, (None, "head_dim")), rel_shape,
                           self.param_dtype)

    x = x.astype(self.dtype)
    qkv = jnp.einsum("bnyxd,dthk->tbnyxhk", x, qkv_kernel.astype(self.dtype)) + \
        qkv_bias.astype(self.dtype)[:, None, None, None, None]  # [3, B, N, h, w, H, Dh]
    query, key, value = qkv[0], qkv[1], qkv[2]
    query = with_logical_constraint(query, ("activation_batch", None, None, None, "activation_heads", None))
    size = x.shape[2:4]
    logits = jnp.einsum("bnyxhk,bnuvhk->bnhyxuv", query * head_dim ** -0.5, key)  # [B, N, H, h, w, h, w]
    rel = decomposed_rel_pos(einops.rearrange(query, "b n y x h k -> b n h y x k"), rel_pos_h, rel_pos_w, size)
    logits = einops.rearrange(logits + rel, "b n h y x u v -> b n h (y x) (u v)")  # [B, N, H, hw, hw]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    values = einops.rearrange(value, "b n y x h k -> b n (y x) h k")
    attended = jnp.einsum("bnhqk,bnkhc->bnqhc", weights, values)  # [B, N, hw, H, Dh]
    attended = einops.rearrange(attended, "b n (y x) h c -> b n y x h c", y=size[0])
    return jnp.einsum("bnyxhc,hcd->bnyxd", attended, proj_kernel.astype(self.dtype)) + proj_bias.astype(self.dtype)


class SamVitMlp(nn.Module):
  """lin1 → GELU (exact) → lin2."""
  config: SamVitConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, h, w, D]
    cfg = self.config
    x = logical_dense(cfg.mlp_dim, ("embed", "mlp"), "lin1", self.dtype, self.param_dtype)(x)
    x = with_logical_constraint(jax.nn.gelu(x, approximate=False),
                                ("activation_batch", None, None, "activation_mlp"))
    return logical_dense(cfg.width, ("mlp", "embed"), "lin2", self.dtype, self.param_dtype)(x)


class SamVitBlock(nn.Module):
  """Pre-norm block: x + attn(LN(x)) in windows of `window` (0: global), then x + mlp(LN(x)). [B, h, w, D]."""
  config: SamVitConfig
  window: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    normed = logical_layer_norm("layer_norm1", cfg.layer_norm_eps, self.dtype, self.param_dtype)(x)
    size = normed.shape[1:3]
    if self.window > 0:
      windows, padded_size = window_partition(normed, self.window)  # [B, N, ws, ws, D]
      table_size = self.window
    else:
      windows, table_size = normed[:, None], cfg.grid_size  # [B, 1, h, w, D]
    attended = SamVitAttention(cfg, table_size, self.dtype, self.param_dtype, name="attn")(windows)
    attended = window_unpartition(attended, padded_size, size) if self.window > 0 else attended[:, 0]
    x = x + attended
    normed = logical_layer_norm("layer_norm2", cfg.layer_norm_eps, self.dtype, self.param_dtype)(x)
    x = x + SamVitMlp(cfg, self.dtype, self.param_dtype, name="mlp")(normed)
    return with_logical_constraint(x, HIDDEN)


class SamVitNeck(nn.Module):
  """conv 1×1 (no bias) → LayerNorm2d → conv 3×3 (no bias) → LayerNorm2d: [B, h, w, D] → [B, h, w, out]."""
  config: SamVitConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    conv = lambda size, name: logical_conv(cfg.out_channels, size, name, self.dtype, self.param_dtype)
    x = conv(1, "conv1")(x)
    x = logical_layer_norm("layer_norm1", 1e-6, self.dtype, self.param_dtype)(x)
    x = conv(3, "conv2")(x)
    return logical_layer_norm("layer_norm2", 1e-6, self.dtype, self.param_dtype)(x)


class SamVisionEncoder(nn.Module):
  """images [B, S, S, 3] (S = `image_size`, the native grid) → image embeddings [B, S/p, S/p, out_channels]."""
  config: SamVitConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"SamVisionEncoder: expected images [B, H, W, 3], got shape {images.shape}")
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise ValueError(f"SamVisionEncoder: image size {images.shape[1]}x{images.shape[2]} differs from the native "
                       f"{cfg.image_size}x{cfg.image_size} (model.sam_vit.image_size) its position embeddings and "
                       f"global relative tables are made for")
    patches = nn.Conv(
        cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
        dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed",
        kernel_init=logical_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        # Not zero: zero-padded patches would meet the first LayerNorm with zero variance (layers.fan_in_uniform).
        bias_init=logical_init(fan_in_uniform(cfg.patch_size * cfg.patch_size * images.shape[-1]), ("embed",)),
    )(images.astype(self.dtype))  # [B, g, g, D]
    pos_embed = self.param("pos_embed", logical_init(nn.initializers.zeros, (None, None, "embed")),
                           (cfg.grid_size, cfg.grid_size, cfg.width), self.param_dtype)
    hidden = with_logical_constraint(patches + pos_embed.astype(self.dtype)[None], HIDDEN)
    for index in range(cfg.depth):
      hidden = SamVitBlock(cfg, cfg.block_window(index), self.dtype, self.param_dtype, name=f"layers_{index}")(hidden)
    return SamVitNeck(cfg, self.dtype, self.param_dtype, name="neck")(hidden)  # [B, g, g, out]
