"""The XLA:CPU flags the package sets on import: added once, never over a flag the user set, only where known."""

import os
import subprocess
import sys

from unires_jax import xla_defaults

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_are_added_for_known_jaxlib_and_never_override_the_users():
  name = "xla_cpu_experimental_ynn_fusion_type"
  assert xla_defaults.flags_to_add("", "0.10") == [f"--{name}="]
  assert xla_defaults.flags_to_add(f"--foo=1 --{name}=dot", "0.10") == []
  assert xla_defaults.flags_to_add("--foo=1", "0.99") == []  # an unknown XLA flag would abort the process
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_defaults.apply(environ) == [f"--{name}="]
  assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 --{name}="
  assert xla_defaults.apply(environ) == []  # idempotent


def test_importing_the_package_sets_the_flag_before_the_backend_compiles():
  """In a fresh process: the flag is in XLA_FLAGS after `import unires_jax`, and XLA accepts it (a computation runs;
  an unknown flag would abort)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import os, unires_jax, jax.numpy as jnp; print(os.environ['XLA_FLAGS']); "
          "print(float((jnp.ones((4, 4)) @ jnp.ones((4, 4))).sum()))")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=_REPO, capture_output=True, text=True, check=True)
  flags, total = out.stdout.split()[-2:]
  assert flags == "--xla_cpu_experimental_ynn_fusion_type=" and float(total) == 64.0
