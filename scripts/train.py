"""Train (and evaluate) UniRES++ from an ml-collections config.

    python scripts/train.py --config configs/toy.py --workdir runs/toy [--config.train.total_steps=100]

On several hosts (Cloud TPU slices) `jax.distributed.initialize()` discovers the cluster by itself; pass
`--coordinator_address/--num_processes/--process_id` to set it explicitly (e.g. several processes on one machine).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unires_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, evaluation and overlays.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Fake CPU devices for this process (tests, laptops).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _COORDINATOR.value or _MULTIHOST.value:
    # Cross-process collectives for CPU devices (no effect on TPU/GPU); set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from unires_jax import run as runner

  logging.set_verbosity(logging.INFO)
  runner.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_main(main, "train.py", absl_app=True)
