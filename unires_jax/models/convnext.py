"""ConvNeXt (the high-resolution encoder E_h, CLIP ConvNeXt-L in the paper), numerically equal to HF
`ConvNextModel` (the timm/open_clip design under other names); returns the four stage outputs, NHWC.

Blocks are a plain Python loop (stages differ in depth and width, and even ConvNeXt-L has only 36 blocks), named
`stage_{s}/block_{i}` so the conversion tables read one-to-one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unires_jax.models.layers import fan_in_uniform, logical_dense, logical_layer_norm
from unires_jax.sharding import with_logical_constraint, logical_init

Dtype = Any

FEATURE_MAP = ("activation_batch", None, None, "activation_embed")
STEM_STRIDE = 4
NUM_STAGES = 4
TOTAL_STRIDE = 32


DEPTHWISE_IMPLS = ("shifted", "grouped")
# The one place the depthwise formulation is chosen per backend. XLA:CPU runs a grouped convolution with one
# group per channel far below its matmul rate (0.5–0.7 GFLOP/s measured), while 49 shifted multiply-adds of the
# padded map stay on its fast elementwise path (docs/benchmarks.md); cuDNN and the TPU convolution units run the
# grouped form well.
DEPTHWISE_BY_BACKEND = {"cpu": "shifted"}
DEPTHWISE_DEFAULT = "grouped"


def resolve_depthwise_impl(impl: str, backend: str | None = None) -> str:
  if impl != "auto":
    return impl
  return DEPTHWISE_BY_BACKEND.get(backend or jax.default_backend(), DEPTHWISE_DEFAULT)


def depthwise_conv(features: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
  """Per-channel k×k convolution with 'same' zero padding: [B, H, W, C] * [k, k, 1, C] → [B, H, W, C]."""
  size = kernel.shape[0]
  pad = size // 2
  if impl == "grouped":
    return jax.lax.conv_general_dilated(features, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=features.shape[-1])
  height, width = features.shape[1:3]
  padded = jnp.pad(features, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # [B, H+k-1, W+k-1, C]
  out = jnp.zeros_like(features)
  for i in range(size):  # row by row: each row's k taps share one slice of the padded map
    rows = padded[:, i:i + height]  # [B, H, W+k-1, C]
    out = out + sum(rows[:, :, j:j + width] * kernel[i, j, 0] for j in range(size))
  return out


class DepthwiseConv(nn.Module):
  """The block's 7×7 depthwise conv; parameters `kernel` [k, k, 1, C] and `bias` [C] as a grouped `nn.Conv`."""
  dim: int
  kernel_size: int
  impl: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:  # [B, H, W, C]
    # Replicated (49 weights per channel): sharding its channels would make the partitioner split the
    # depthwise conv by channel against the batch-sharded input instead of gathering the kernel.
    kernel = self.param("kernel", logical_init(nn.initializers.lecun_normal(), ("conv_spatial", None, None, None)),
                        (self.kernel_size, self.kernel_size, 1, self.dim), self.param_dtype)
    bias = self.param("bias", logical_init(nn.initializers.zeros, ("norm",)), (self.dim,), self.param_dtype)
    out = depthwise_conv(features.astype(self.dtype), kernel.astype(self.dtype),
                         resolve_depthwise_impl(self.impl))
    return out + bias.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class ConvNextConfig:
  """The `model.convnext` section: `ConvNextConfig(**cfg.model.convnext.to_dict())`."""
  image_size: int
  depths: Sequence[int]
  dims: Sequence[int]
  layer_norm_eps: float = 1e-6
  layer_scale_init: float = 1e-6
  # How the 7×7 depthwise convolution runs: "auto" (DEPTHWISE_BY_BACKEND), "shifted" or "grouped".
  depthwise_impl: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
    if len(self.depths) != NUM_STAGES or len(self.dims) != NUM_STAGES:
      raise ValueError(f"ConvNextConfig: depths {self.depths} and dims {self.dims} must each have {NUM_STAGES} "
                       f"entries (one per stage)")
    if self.depthwise_impl not in ("auto",) + DEPTHWISE_IMPLS:
      raise ValueError(f"ConvNextConfig: depthwise_impl must be 'auto' or one of {DEPTHWISE_IMPLS}, got "
                       f"{self.depthwise_impl!r}")
    if self.image_size % TOTAL_STRIDE:
      raise ValueError(f"ConvNextConfig: image_size {self.image_size} is not divisible by {TOTAL_STRIDE}")


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, param_dtype: Dtype, name: str,
          in_axis: str | None, bias_init=nn.initializers.zeros) -> nn.Conv:
  """A strided, unpadded conv (the stem and the downsampling layers)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="VALID", dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=logical_init(nn.initializers.lecun_normal(),
                                                          ("conv_spatial", None, in_axis, "mlp")),
                 bias_init=logical_init(bias_init, ("mlp",)))


class ConvNextBlock(nn.Module):
  """x + γ · pwconv2(GELU(pwconv1(LayerNorm(dwconv7x7(x))))), channels last."""
  config: ConvNextConfig
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:  # [B, H, W, C]
    cfg = self.config
    hidden = DepthwiseConv(self.dim, 7, cfg.depthwise_impl, self.dtype, self.param_dtype,
                           name="dwconv")(features)  # [B, H, W, C]
    hidden = logical_layer_norm("norm", cfg.layer_norm_eps, self.dtype, self.param_dtype)(hidden)
    hidden = logical_dense(4 * self.dim, ("embed", "mlp"), "pwconv1", self.dtype, self.param_dtype)(hidden)
    hidden = nn.gelu(hidden, approximate=False)  # [B, H, W, 4C]
    hidden = with_logical_constraint(hidden, ("activation_batch", None, None, "activation_mlp"))
    hidden = logical_dense(self.dim, ("mlp", "embed"), "pwconv2", self.dtype, self.param_dtype)(hidden)
    if cfg.layer_scale_init > 0:
      layer_scale = self.param("layer_scale", logical_init(
          nn.initializers.constant(cfg.layer_scale_init), ("embed",)), (self.dim,), self.param_dtype)
      hidden = hidden * layer_scale.astype(self.dtype)
    return with_logical_constraint(features + hidden, FEATURE_MAP)


class ConvNextStage(nn.Module):
  """Optional downsampling (LayerNorm + 2×2 stride-2 conv; every stage but the first) and `depth` blocks."""
  config: ConvNextConfig
  stage: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:  # [B, H, W, C_{s-1}] → [B, H/2, W/2, C_s]
    cfg = self.config
    dim = cfg.dims[self.stage]
    if self.stage > 0:
      features = logical_layer_norm("downsample_norm", cfg.layer_norm_eps, self.dtype, self.param_dtype)(features)
      features = _conv(dim, 2, 2, self.dtype, self.param_dtype, "downsample_conv", "embed")(features)
      features = with_logical_constraint(features, FEATURE_MAP)
    for index in range(cfg.depths[self.stage]):
      features = ConvNextBlock(cfg, dim, self.dtype, self.param_dtype, name=f"block_{index}")(features)
    return features


class ConvNeXt(nn.Module):
  """images [B, H, W, 3] → [stride-4, -8, -16, -32 feature maps], `[B, H/4, W/4, C0]` ... `[B, H/32, W/32, C3]`.

  Any H, W divisible by 32 work. The final `head_norm` does not touch the feature maps; it is kept so checkpoints
  round-trip and is applied to the globally pooled last map, sown as `intermediates/pooled` (HF's
  `pooler_output`).
  """
  config: ConvNextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"ConvNeXt: expected images [B, H, W, 3], got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % TOTAL_STRIDE or width % TOTAL_STRIDE:
      raise ValueError(f"ConvNeXt: image size {height}x{width} is not divisible by the total stride "
                       f"{TOTAL_STRIDE}")
    # A non-zero stem bias keeps the zero padding of resize-longest images off a zero-variance LayerNorm.
    stem_bias = fan_in_uniform(STEM_STRIDE * STEM_STRIDE * images.shape[-1])
    features = _conv(cfg.dims[0], STEM_STRIDE, STEM_STRIDE, self.dtype, self.param_dtype, "stem_conv", None,
                     stem_bias)(images.astype(self.dtype))  # [B, H/4, W/4, C0]
    features = logical_layer_norm("stem_norm", cfg.layer_norm_eps, self.dtype, self.param_dtype)(features)
    features = with_logical_constraint(features, FEATURE_MAP)
    feature_maps = []
    for stage in range(NUM_STAGES):
      features = ConvNextStage(cfg, stage, self.dtype, self.param_dtype, name=f"stage_{stage}")(features)
      feature_maps.append(features)
    head_norm = logical_layer_norm("head_norm", cfg.layer_norm_eps, self.dtype, self.param_dtype)
    pooled = head_norm(features.mean(axis=(1, 2)))  # [B, C3]
    self.sow("intermediates", "pooled", pooled)
    return feature_maps
