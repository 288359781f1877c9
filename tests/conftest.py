"""Test-wide setup: 8 fake CPU devices, set before JAX initialises its backend."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The repository root holds configs/ and scripts/, which tests import.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
