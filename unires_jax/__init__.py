"""UniRES++ in JAX/Flax: multi-granularity referring expression segmentation."""

from unires_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()  # before any JAX backend starts (unires_jax/xla_defaults.py)
