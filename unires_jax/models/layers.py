"""Small layer constructors with logical axis names (Dense, LayerNorm, conv), shared by the encoders, the mask
decoder and the UniRES-only parts of the model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from unires_jax.sharding import logical_init


def fan_in_uniform(fan_in: int):
  """U(-1/√fan_in, 1/√fan_in), PyTorch's default conv bias.

  For the first layer on zero-padded images: with a zero bias, every padded pixel's features are equal across
  channels, and the LayerNorm after them has zero variance and scales gradients by 1/√eps (10^3 per norm).
  """
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def logical_dense(features: int, names: tuple[str | None, str | None], name: str | None = None, dtype=jnp.float32,
                  param_dtype=jnp.float32) -> nn.Dense:
  """A Dense layer whose kernel carries `names` (in, out) and whose bias carries the output name.

  `name` is for `nn.compact` use; in `setup()` the attribute name names the layer.
  """
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=logical_init(nn.initializers.lecun_normal(), names),
                  bias_init=logical_init(nn.initializers.zeros_init(), (names[1],)))


def logical_layer_norm(name: str, epsilon: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.LayerNorm:
  """A LayerNorm (scale 1, bias 0) whose parameters carry the `norm` name."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=logical_init(nn.initializers.ones_init(), ("norm",)),
                      bias_init=logical_init(nn.initializers.zeros_init(), ("norm",)))


def logical_conv(features: int, kernel: int, name: str, dtype=jnp.float32, param_dtype=jnp.float32,
                 use_bias: bool = False) -> nn.Conv:
  """A SAME-padded square convolution with kernel names (conv_spatial, None, embed, mlp)."""
  return nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=use_bias, dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=logical_init(nn.initializers.lecun_normal(), ("conv_spatial", None, "embed", "mlp")))
