"""Test-wide setup: 8 fake CPU devices, set before JAX initialises its backend."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for every test process of a run (xdist workers and the subprocesses they start
# inherit it): the same tiny model compiled by several test modules is compiled once.
_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The repository root holds configs/ and scripts/, which tests import.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
