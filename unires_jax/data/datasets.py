"""Every dataset layout, registered: importing this module fills `DATASETS` (the layouts of readers/, RefCOCOm as
released from refcocom.py, the synthetic set's four layouts from synthetic.py, each registering itself)."""

from unires_jax.data import readers, refcocom, synthetic  # noqa: F401  (each registers its layouts)

DATASETS = readers.DATASETS
