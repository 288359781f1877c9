"""Training benchmark: AdamW train-step time, examples/s, MFU, compile time and peak host memory per model size.

The step runs as the training loop runs it (jitted with the state's shardings, state donated and threaded from
step to step) on a random batch from `example_batch`. MFU is compiled FLOPs per step ÷ (step time × the FLOP/s of
a large matmul measured in the same run). Peak host memory is the process's peak RSS after each size, so sizes
run smallest first.

    python scripts/benchmark_train.py --out docs/benchmarks/train.json                 # tiny, small on CPU
    python scripts/benchmark_train.py --out train_1b.json --size 1b --device gpu       # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import benchmark_model  # noqa: E402
from unires_jax import perf  # noqa: E402

# Compute dtype and matmul side of the peak per device kind: float32 on CPU, bfloat16 on GPU.
DEVICE_SETTINGS = {"cpu": dict(dtype="float32", matmul_size=2048, matmul_dtype=jnp.float32),
                   "gpu": dict(dtype="bfloat16", matmul_size=8192, matmul_dtype=jnp.bfloat16)}


def measure_training(size: str, batch_size: int, steps: int, peak_flops_per_s: float, dtype: str) -> dict:
  """Compiles the AdamW step for one size, runs `steps` timed steps after one warm-up and reports medians."""
  setup = benchmark_model.Setup(benchmark_model.size_config(size, dtype), batch_size, donate_state=True)
  compiled, compile_s = setup.compile_train_step()
  flops = perf.compiled_flops(compiled)
  state = setup.state
  state, metrics = compiled(state, setup.batch, setup.rng)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, setup.batch, setup.rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  times.sort()
  step_s = times[len(times) // 2]
  loss = float(metrics["loss"])
  return dict(size=size, dtype=dtype, batch_size=batch_size, seq_len=int(setup.batch["input_ids"].shape[1]),
              param_count=setup.param_count, compile_s=compile_s, step_s=step_s, step_s_all=times,
              examples_per_s=batch_size / step_s, flops_per_step=flops,
              **benchmark_model.utilisation(flops, step_s, peak_flops_per_s),
              final_loss=loss, peak_host_memory_mb=perf.peak_host_memory_mb())


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file for the figures")
  parser.add_argument("--size", default="tiny,small", help="comma-separated model sizes, smallest first")
  parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_SETTINGS), help="platform to run on")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per size (the median is kept)")
  parser.add_argument("--batch-sizes", default="", help="size=batch pairs overriding the defaults, e.g. small=4")
  args = parser.parse_args(argv)

  platform = jax.devices()[0].platform
  if platform != args.device:
    raise RuntimeError(f"--device {args.device} asked for, but JAX's default devices are {platform!r} "
                       f"({jax.devices()[0].device_kind}); run on a machine with that device or change --device")
  settings = DEVICE_SETTINGS[args.device]
  batch_sizes = dict(benchmark_model.DEFAULT_BATCH_SIZES)
  for pair in filter(None, args.batch_sizes.split(",")):
    name, value = pair.split("=")
    batch_sizes[name] = int(value)

  peak = perf.matmul_peak_flops(settings["matmul_size"], settings["matmul_dtype"]) * jax.device_count()
  print(json.dumps(dict(matmul_peak_flops_per_s=peak)), flush=True)
  results = []
  for size in filter(None, args.size.split(",")):
    results.append(measure_training(size, batch_sizes[size], args.steps, peak, settings["dtype"]))
    print(json.dumps(results[-1]), flush=True)
  report = dict(date=datetime.date.today().isoformat(), machine=benchmark_model.machine(), steps=args.steps,
                matmul_size=settings["matmul_size"], matmul_peak_flops_per_s=peak, sizes=results)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  main()
