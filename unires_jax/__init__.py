"""UniRES++ in JAX/Flax: multi-granularity referring expression segmentation."""
