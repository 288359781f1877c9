"""Per-program XLA:CPU compiler options: given only where measured, accepted by this XLA, numerics unchanged."""

import os
import subprocess
import sys

import jax
import numpy as np

from configs import common
from unires_jax import xla_defaults
from unires_jax.models import convnext

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_options_only_for_a_large_convnext_on_cpu_with_a_known_jaxlib():
  name = "xla_cpu_experimental_ynn_fusion_type"
  assert xla_defaults.compiler_options(1024, "cpu", "0.10") == {name: ""}
  assert xla_defaults.compiler_options(128, "cpu", "0.10") is None  # the toy model trains 3× slower with it
  assert xla_defaults.compiler_options(None, "cpu", "0.10") is None
  assert xla_defaults.compiler_options(1024, "gpu", "0.10") is None
  assert xla_defaults.compiler_options(1024, "cpu", "0.99") is None  # an option XLA does not know is refused
  assert xla_defaults.for_model_config(common.model_config("7b")) == {name: ""}
  assert xla_defaults.for_model_config(common.model_config("tiny")) is None


def test_importing_the_package_leaves_xla_flags_alone():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = "import os, unires_jax, unires_jax.models.unires; print(repr(os.environ.get('XLA_FLAGS')))"
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=_REPO, capture_output=True, text=True, check=True)
  assert out.stdout.split()[-1] == "None"


def test_the_option_compiles_and_keeps_a_convnext_block_numerically_equal():
  cfg = convnext.ConvNextConfig(image_size=1024, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
  block = convnext.ConvNextBlock(cfg, 16)
  features = jax.random.normal(jax.random.key(0), (1, 24, 24, 16))
  params = block.init(jax.random.key(1), features)
  params = jax.tree.map(lambda p: p + 0.1, params)  # layer scale 1e-6 would hide the branch
  plain = jax.jit(block.apply)(params, features)
  options = xla_defaults.compiler_options(cfg.image_size)
  assert options == (xla_defaults.NO_YNN_FUSIONS if jax.default_backend() == "cpu" else None)
  tuned = jax.jit(block.apply, compiler_options=options)(params, features)
  np.testing.assert_allclose(np.asarray(tuned), np.asarray(plain), atol=1e-5, rtol=1e-5)
  assert float(np.abs(np.asarray(plain) - np.asarray(features)).max()) > 1e-2
