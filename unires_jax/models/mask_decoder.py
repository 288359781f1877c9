"""SAM's mask decoder (two-way transformer, mask upscaling, hypernetworks, IoU head) and its prompt encoder pieces.

Module and parameter names mirror Hugging Face `SamModel` (`mask_decoder.*`, `prompt_encoder.shared_embedding`,
`prompt_encoder.no_mask_embed`) so `unires_jax/convert/sam.py` maps SAM weights one to one. In UniRES the sparse
prompts are the LLM's `[SEG]` hidden states, already projected to the decoder width, and the dense prompt is always
SAM's "no mask" embedding. With `point_prompts=True` (off by default, so UniRES's parameter tree is unchanged) the
prompt encoder also holds SAM's point prompt embedding (negative / positive point, not-a-point), which SAM's
automatic mask generation (`unires_jax/proposals/sam.py`) prompts with; box and mask prompts are not implemented.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from unires_jax.models.layers import logical_dense, logical_layer_norm
from unires_jax.sharding import with_logical_constraint, logical_init

# LayerNorm epsilons SAM fixes in code rather than in its config: the final token→image attention's norm uses
# torch's default, the upscaling LayerNorm2d SAM's own default.
FINAL_ATTN_NORM_EPS = 1e-5
UPSCALE_NORM_EPS = 1e-6
# SAM draws its random Fourier matrix from N(0, scale²) with scale 1.
POSITIONAL_EMBEDDING_SCALE = 1.0

_TOKENS = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig:
  """The `model.mask_decoder` config section (`configs/common.py::_mask_decoder`)."""
  transformer_dim: int = 256
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  layer_norm_eps: float = 1e-6
  point_prompts: bool = False  # SAM's point prompt embeddings (prompt_encoder.point_embed_{0,1}, not_a_point_embed)

  def __post_init__(self):
    dim = self.transformer_dim
    if dim % 8:
      raise ValueError(f"mask_decoder.transformer_dim must be divisible by 8 (upscaling to dim/4 and dim/8 "
                       f"channels), got {dim}")
    for rate in (1, self.attention_downsample_rate):
      if (dim // rate) % self.num_heads:
        raise ValueError(f"mask_decoder: attention width transformer_dim/{rate} = {dim // rate} is not divisible "
                         f"by num_heads = {self.num_heads}")
    if self.iou_head_depth < 2:
      raise ValueError(f"mask_decoder.iou_head_depth must be >= 2 (in and out projections), got "
                       f"{self.iou_head_depth}")

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1


def _embed(num: int, dim: int, name: str, param_dtype: Any) -> nn.Embed:
  # torch's nn.Embedding initialisation, N(0, 1).
  return nn.Embed(num, dim, param_dtype=param_dtype, name=name,
                  embedding_init=logical_init(nn.initializers.normal(1.0), (None, "embed")))


class RandomFourierEmbedding(nn.Module):
  """SAM's positional encoding: coordinates in [0, 1]² → [sin, cos](2π · (2c - 1) · G), G ~ N(0, 1) [2, C/2]."""
  num_pos_feats: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, coords: jax.Array) -> jax.Array:
    matrix = self.param(
        "positional_embedding",
        logical_init(nn.initializers.normal(POSITIONAL_EMBEDDING_SCALE), (None, "embed")),
        (2, self.num_pos_feats), self.param_dtype)
    projected = (2.0 * coords.astype(jnp.float32) - 1.0) @ matrix.astype(jnp.float32)  # [..., C/2]
    projected = 2.0 * math.pi * projected
    return jnp.concatenate([jnp.sin(projected), jnp.cos(projected)], axis=-1)  # [..., C]


# SAM's point labels: a negative (background) point, a positive (foreground) point, and padding (not a point).
NEGATIVE_POINT, POSITIVE_POINT, NOT_A_POINT = 0, 1, -1


class DensePromptEncoder(nn.Module):
  """The parts of SAM's prompt encoder the decoder needs: the grid's positional encoding and the no-mask prompt;
  with `config.point_prompts`, also the point prompt embedding (`embed_points`)."""
  config: MaskDecoderConfig
  param_dtype: Any = jnp.float32

  def setup(self):
    dim = self.config.transformer_dim
    self.shared_embedding = RandomFourierEmbedding(dim // 2, param_dtype=self.param_dtype)
    self.no_mask_embed = _embed(1, dim, "no_mask_embed", self.param_dtype)
    if self.config.point_prompts:
      self.point_embed_0 = _embed(1, dim, "point_embed_0", self.param_dtype)  # negative point
      self.point_embed_1 = _embed(1, dim, "point_embed_1", self.param_dtype)  # positive point
      self.not_a_point_embed = _embed(1, dim, "not_a_point_embed", self.param_dtype)

  def __call__(self, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """(positional encoding of the h×w grid [h, w, C] at pixel centres, dense prompt [C])."""
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    grid = jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), axis=-1)  # [h, w, 2] as (x, y)
    dense_prompt = self.no_mask_embed(jnp.zeros((1,), jnp.int32))[0]  # [C]
    return self.shared_embedding(grid), dense_prompt

  def embed_points(self, coords: jax.Array, labels: jax.Array) -> jax.Array:
    """SAM's point prompts: coords [B, N, 2] as (x, y) in [0, 1] of the model's input canvas (pixel + 0.5, divided
    by the canvas side), labels [B, N] int (1 positive, 0 negative, -1 not a point) → tokens [B, N, C].

    A point's token is its Fourier encoding plus the embedding of its label; a not-a-point token is that embedding
    alone (SAM pads a point prompt given without a box with one such token).
    """
    if not self.config.point_prompts:
      raise ValueError("mask decoder: point prompts need mask_decoder.point_prompts=True")
    zero = jnp.zeros((1,), jnp.int32)
    labels = labels[..., None]  # [B, N, 1]
    encoded = self.shared_embedding(coords)  # [B, N, C]
    tokens = jnp.where(labels == NOT_A_POINT, self.not_a_point_embed(zero), encoded)
    tokens = tokens + jnp.where(labels == NEGATIVE_POINT, self.point_embed_0(zero), 0.0)
    return tokens + jnp.where(labels == POSITIVE_POINT, self.point_embed_1(zero), 0.0)


class Attention(nn.Module):
  """SAM attention: q/k/v projected to `dim / downsample_rate`, split into heads, softmax in float32."""
  config: MaskDecoderConfig
  downsample_rate: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    cfg = self.config
    inner = cfg.transformer_dim // self.downsample_rate
    dense = lambda n, names, name: logical_dense(n, names, name, self.dtype, self.param_dtype)
    q = dense(inner, ("embed", "heads"), "q_proj")(query)  # [B, Tq, inner]
    k = dense(inner, ("embed", "heads"), "k_proj")(key)  # [B, Tk, inner]
    v = dense(inner, ("embed", "heads"), "v_proj")(value)  # [B, Tk, inner]
    q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=cfg.num_heads) for t in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, H, Tq, Tk]
    out = rearrange(jnp.einsum("bhqk,bhkd->bhqd", probs, v), "b h t d -> b t (h d)")  # [B, Tq, inner]
    return dense(cfg.transformer_dim, ("heads", "embed"), "out_proj")(out)


class MLPBlock(nn.Module):
  config: MaskDecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    hidden = nn.relu(logical_dense(cfg.mlp_dim, ("embed", "mlp"), "lin1", self.dtype, self.param_dtype)(x))
    return logical_dense(cfg.transformer_dim, ("mlp", "embed"), "lin2", self.dtype, self.param_dtype)(hidden)


class TwoWayAttentionBlock(nn.Module):
  """Token self-attention, token→image cross-attention, MLP, image→token cross-attention (post-norm)."""
  config: MaskDecoderConfig
  skip_first_layer_pe: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: logical_layer_norm(name, cfg.layer_norm_eps, **kw)
    rate = cfg.attention_downsample_rate

    if self.skip_first_layer_pe:
      queries = Attention(cfg, 1, name="self_attn", **kw)(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + Attention(cfg, 1, name="self_attn", **kw)(q, q, queries)
    queries = norm("layer_norm1")(queries)

    queries = queries + Attention(cfg, rate, name="cross_attn_token_to_image", **kw)(
        queries + query_pe, keys + key_pe, keys)
    queries = norm("layer_norm2")(queries)

    queries = norm("layer_norm3")(queries + MLPBlock(cfg, name="mlp", **kw)(queries))

    keys = keys + Attention(cfg, rate, name="cross_attn_image_to_token", **kw)(
        keys + key_pe, queries + query_pe, queries)
    keys = norm("layer_norm4")(keys)
    return with_logical_constraint(queries, _TOKENS), with_logical_constraint(keys, _TOKENS)


class TwoWayTransformer(nn.Module):
  config: MaskDecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, point_embeddings, image_embeddings, image_pe):
    """point_embeddings [B, T, C], image_embeddings / image_pe [B, hw, C] → (queries [B, T, C], keys [B, hw, C])."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries, keys = point_embeddings, image_embeddings
    for i in range(cfg.depth):
      queries, keys = TwoWayAttentionBlock(cfg, skip_first_layer_pe=(i == 0), name=f"layers_{i}", **kw)(
          queries, keys, point_embeddings, image_pe)
    attn = Attention(cfg, cfg.attention_downsample_rate, name="final_attn_token_to_image", **kw)(
        queries + point_embeddings, keys + image_pe, keys)
    queries = logical_layer_norm("layer_norm_final_attn", FINAL_ATTN_NORM_EPS, **kw)(queries + attn)
    return queries, keys


class FeedForward(nn.Module):
  """SAM's MLP head: proj_in, (num_layers - 2) hidden layers, proj_out, ReLU between them.

  The small outputs (C/8 hypernetwork channels, M IoU scores) stay replicated: with the hypernetwork output
  named `embed` (sharded over fsdp), jax 0.10.2's CPU partitioner gave a different result on a 2×2×2 mesh than
  unsharded (tests/test_mask_decoder.py::test_sharded_equals_unsharded).
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  output_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(logical_dense(self.hidden_dim, ("embed", "mlp"), "proj_in", **kw)(x))
    for j in range(self.num_layers - 2):
      # The hidden width plays the embed role on input so each kernel carries two different logical names.
      x = nn.relu(logical_dense(self.hidden_dim, ("embed", "mlp"), f"layers_{j}", **kw)(x))
    return logical_dense(self.output_dim, ("mlp", self.output_name), "proj_out", **kw)(x)


class PatchConvTranspose(nn.Module):
  """ConvTranspose2d with kernel = stride = `patch`: each input pixel paints its own patch×patch block."""
  features: int
  patch: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Flax refuses a logical name repeated within one array, so only the first spatial dim is named.
    kernel = self.param(
        "kernel",
        logical_init(nn.initializers.lecun_normal(), ("conv_spatial", None, "embed", "mlp")),
        (self.patch, self.patch, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", logical_init(nn.initializers.zeros_init(), ("mlp",)),
                      (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    blocks = jnp.einsum("bhwc,pqco->bhpwqo", x, kernel.astype(self.dtype))  # [B, h, p, w, p, O]
    out = rearrange(blocks, "b h p w q o -> b (h p) (w q) o")  # [B, h·p, w·p, O]
    return out + bias.astype(self.dtype)


class MaskDecoder(nn.Module):
  """SAM mask decoder: (image embeddings, sparse prompts) → (mask logits at 4× the grid, predicted IoU)."""
  config: MaskDecoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, sparse_prompt_embeddings: jax.Array | None,
               multimask_output: bool = False, point_coords: jax.Array | None = None,
               point_labels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """image_embeddings [B, h, w, C], sparse_prompt_embeddings [B, Q, C] → masks [B, M, 4h, 4w], iou [B, M].

    M = num_multimask_outputs with `multimask_output`, else 1 (SAM's single-mask token). With point prompts
    (`point_coords` [B, N, 2], `point_labels` [B, N]; see `DensePromptEncoder.embed_points`) their tokens follow the
    given sparse prompts, which may then be None.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, channels = image_embeddings.shape
    prompt_encoder = DensePromptEncoder(cfg, self.param_dtype, name="prompt_encoder")
    if point_coords is not None:
      point_tokens = prompt_encoder.embed_points(point_coords, point_labels)  # [B, N, C]
      sparse_prompt_embeddings = (point_tokens if sparse_prompt_embeddings is None else
                                  jnp.concatenate([sparse_prompt_embeddings, point_tokens.astype(
                                      sparse_prompt_embeddings.dtype)], axis=1))
    if sparse_prompt_embeddings is None:
      raise ValueError("mask decoder: no prompt (neither sparse_prompt_embeddings nor point_coords)")
    if channels != cfg.transformer_dim or sparse_prompt_embeddings.shape[-1] != cfg.transformer_dim:
      raise ValueError(f"mask decoder expects width {cfg.transformer_dim}; got image embeddings "
                       f"{image_embeddings.shape} and sparse prompts {sparse_prompt_embeddings.shape}")
    if sparse_prompt_embeddings.ndim != 3 or sparse_prompt_embeddings.shape[0] != batch:
      raise ValueError(f"sparse_prompt_embeddings must be [B={batch}, Q, C], got {sparse_prompt_embeddings.shape}")

    image_pe, dense_prompt = prompt_encoder(height, width)
    num_mask_tokens = cfg.num_mask_tokens
    output_tokens = jnp.concatenate([
        _embed(1, channels, "iou_token", self.param_dtype)(jnp.arange(1)),
        _embed(num_mask_tokens, channels, "mask_tokens", self.param_dtype)(jnp.arange(num_mask_tokens)),
    ], axis=0)  # [1 + M_all, C]
    tokens = jnp.concatenate([jnp.broadcast_to(output_tokens, (batch, *output_tokens.shape)),
                              sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)  # [B, T, C]
    tokens = with_logical_constraint(tokens.astype(self.dtype), _TOKENS)

    image = image_embeddings + dense_prompt.astype(image_embeddings.dtype)  # [B, h, w, C]
    keys = with_logical_constraint(rearrange(image, "b h w c -> b (h w) c").astype(self.dtype), _TOKENS)
    key_pe = jnp.broadcast_to(rearrange(image_pe, "h w c -> 1 (h w) c"), keys.shape).astype(self.dtype)

    queries, keys = TwoWayTransformer(cfg, name="transformer", **kw)(tokens, keys, key_pe)
    iou_token_out = queries[:, 0]  # [B, C]
    mask_tokens_out = queries[:, 1:1 + num_mask_tokens]  # [B, M_all, C]

    grid = rearrange(keys, "b (h w) c -> b h w c", h=height, w=width)
    upscaled = PatchConvTranspose(channels // 4, name="upscale_conv1", **kw)(grid)  # [B, 2h, 2w, C/4]
    upscaled = nn.gelu(logical_layer_norm("upscale_layer_norm", UPSCALE_NORM_EPS, **kw)(upscaled), approximate=False)
    upscaled = nn.gelu(PatchConvTranspose(channels // 8, name="upscale_conv2", **kw)(upscaled),
                       approximate=False)  # [B, 4h, 4w, C/8]

    hyper_in = jnp.stack([
        FeedForward(channels, channels // 8, 3, name=f"output_hypernetworks_mlps_{i}", **kw)(mask_tokens_out[:, i])
        for i in range(num_mask_tokens)
    ], axis=1)  # [B, M_all, C/8]
    masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, upscaled)  # [B, M_all, 4h, 4w]
    iou_pred = FeedForward(cfg.iou_head_hidden_dim, num_mask_tokens, cfg.iou_head_depth,
                           name="iou_prediction_head", **kw)(iou_token_out)  # [B, M_all]

    selected = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, selected].astype(jnp.float32), iou_pred[:, selected].astype(jnp.float32)
