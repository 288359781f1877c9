"""Training benchmark: AdamW train-step time, examples/s, MFU, compile time and peak host memory per model size.

The step runs as the training loop runs it (jitted with the state's shardings, state donated and threaded from
step to step) on a random batch from `example_batch`. MFU is compiled FLOPs per step ÷ (step time × the FLOP/s of
a large matmul measured in the same run). Peak host memory is the process's peak RSS after each size, so sizes
run smallest first; peak device memory comes from `device.memory_stats()` where the backend reports it.

Sizes `1b` and `7b` train as the full recipe does (`configs/unires_7b.py`: image encoders and LLM frozen, LoRA on
the LLM, the remat policy of the model config); `--recipe` applies it to any size. The script refuses to run
when the devices are not what `--device` / `--expect-device` claim.

    python scripts/benchmark_train.py --out docs/benchmarks/train.json                 # tiny, small on CPU
    python scripts/benchmark_train.py --out train_7b.json --size 7b --device gpu --expect-device H200
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
from configs import unires_7b  # noqa: E402
from unires_jax import benchmark_io, cli, perf  # noqa: E402

# Compute dtype and matmul side of the peak per device kind: float32 on CPU, bfloat16 on GPU.
DEVICE_SETTINGS = {"cpu": dict(dtype="float32", matmul_size=2048, matmul_dtype=jnp.float32),
                   "gpu": dict(dtype="bfloat16", matmul_size=8192, matmul_dtype=jnp.bfloat16)}


RECIPE_SIZES = ("1b", "7b")  # sizes that train with the full recipe unless --recipe none


def check_devices(device: str, expect_device: str) -> str:
  """The device kind, after refusing a platform other than `device` or a kind not containing `expect_device`."""
  first = jax.devices()[0]
  if first.platform != device:
    raise RuntimeError(f"--device {device} asked for, but JAX's default devices are {first.platform!r} "
                       f"({first.device_kind}); run on a machine with that device or change --device")
  if expect_device and expect_device.lower() not in first.device_kind.lower():
    raise RuntimeError(f"--expect-device {expect_device!r} asked for, but the device kind is "
                       f"{first.device_kind!r}")
  return first.device_kind


def peak_device_memory_bytes() -> int | None:
  """Largest peak bytes in use over the local devices (None where the backend keeps no memory stats)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def measure_training(size: str, batch_size: int, steps: int, peak_flops_per_s: float, dtype: str,
                     recipe: bool = False, devices: list[jax.Device] | None = None) -> dict:
  """Compiles the AdamW step for one size, runs `steps` timed steps after one warm-up and reports medians."""
  if recipe:
    config = unires_7b.get_config(size)
    model_cfg, train_cfg = config.model, config.train
    model_cfg.dtype = dtype
  else:
    model_cfg, train_cfg = benchmark_model.size_config(size, dtype), None
  setup = benchmark_model.Setup(model_cfg, batch_size, donate_state=True, train_cfg=train_cfg, devices=devices)
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
  seq_len = int(setup.batch["input_ids"].shape[1])
  return dict(size=size, dtype=dtype, recipe="configs/unires_7b.py" if recipe else "all trained, no LoRA",
              remat_policy=model_cfg.llm.remat_policy, batch_size=batch_size, seq_len=seq_len,
              param_count=setup.param_count, trainable_count=setup.trainable_count, compile_s=compile_s,
              step_s=step_s, step_s_all=times, examples_per_s=batch_size / step_s,
              tokens_per_s=batch_size * seq_len / step_s, flops_per_step=flops,
              **benchmark_model.utilisation(flops, step_s, peak_flops_per_s),
              final_loss=loss, peak_host_memory_mb=perf.peak_host_memory_mb(),
              peak_device_memory_bytes=peak_device_memory_bytes())


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file for the figures")
  parser.add_argument("--size", default="tiny,small", help="comma-separated model sizes, smallest first")
  parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_SETTINGS), help="platform to run on")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per size (the median is kept)")
  parser.add_argument("--batch-sizes", default="", help="size=batch pairs overriding the defaults, e.g. small=4")
  parser.add_argument("--expect-device", default="", help="refuse unless the device kind contains this, e.g. H200")
  parser.add_argument("--recipe", default="auto", choices=("auto", "unires_7b", "none"),
                      help=f"train as configs/unires_7b.py (frozen encoders, LoRA); auto: for {RECIPE_SIZES}")
  parser.add_argument("--devices", type=int, default=0, help="train on the first N devices (0: all)")
  args = parser.parse_args(argv)

  device_kind = check_devices(args.device, args.expect_device)
  devices = perf.select_devices(args.devices)
  settings = DEVICE_SETTINGS[args.device]
  batch_sizes = benchmark_io.parse_batch_sizes(args.batch_sizes, benchmark_model.DEFAULT_BATCH_SIZES)

  peak = perf.matmul_peak_flops(settings["matmul_size"], settings["matmul_dtype"]) * len(devices)
  print(json.dumps(dict(matmul_peak_flops_per_s=peak)), flush=True)
  results = []
  for size in filter(None, args.size.split(",")):
    recipe = args.recipe == "unires_7b" or (args.recipe == "auto" and size in RECIPE_SIZES)
    results.append(measure_training(size, batch_sizes[size], args.steps, peak, settings["dtype"], recipe, devices))
    print(json.dumps(results[-1]), flush=True)
  report = dict(date=datetime.date.today().isoformat(), machine=perf.machine(devices), device_kind=device_kind,
                device_count=len(devices), steps=args.steps,
                matmul_size=settings["matmul_size"], matmul_peak_flops_per_s=peak, sizes=results)
  benchmark_io.write_report(args.out, report)
  return report


if __name__ == "__main__":
  cli.run_main(main, "benchmark_train.py")
