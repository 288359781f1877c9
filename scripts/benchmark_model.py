"""Model benchmark: compile, forward and train-step time, achieved FLOP/s and MFU per model size, and how
compile time grows with LLM depth with and without `scan_layers`.

FLOPs come from XLA's cost analysis of the compiled function; MFU divides the achieved FLOP/s by the FLOP/s of a
large matmul measured in the same run on the same devices (the practical peak of this machine).

    python scripts/benchmark_model.py --out docs/benchmarks/model.json --sizes tiny,small
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from configs import common  # noqa: E402
from unires_jax import benchmark_io, cli, perf, sharding  # noqa: E402
from unires_jax.models.example_batch import example_batch  # noqa: E402
from unires_jax.models.unires import UniRESConfig  # noqa: E402
from unires_jax.train import lora as lora_lib  # noqa: E402
from unires_jax.train import optimizer as optimizer_lib  # noqa: E402
from unires_jax.train import partition  # noqa: E402
from unires_jax.train import state as state_lib  # noqa: E402
from unires_jax.train import step as step_lib  # noqa: E402

LOSS_WEIGHTS = dict(ce=1.0, bce=2.0, dice=0.5)
DEFAULT_BATCH_SIZES = {"tiny": 8, "small": 2, "1b": 8, "7b": 8}


def optim_config(total_steps: int = 1000) -> ml_collections.ConfigDict:
  """AdamW as in the training configs (warmup + cosine, clipping), sized for a benchmark run."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=10, total_steps=total_steps, final_lr_ratio=0.1, b1=0.9, b2=0.98,
      eps=1e-8, weight_decay=0.01, grad_clip=1.0, grad_accum_steps=1, lr_multipliers=[]))


class Setup:
  """A model of one size with its AdamW train state on a data-parallel mesh over `devices` (all of JAX's by
  default), a random batch, and jitted (not yet compiled) forward and train-step functions. `donate_state` donates
  the state to the train step, as the training loop does (then each call must be given the state the previous one
  returned)."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, batch_size: int, seed: int = 0,
               materialize: bool = True, donate_state: bool = False,
               train_cfg: ml_collections.ConfigDict | None = None, devices: Sequence[jax.Device] | None = None):
    """`train_cfg` (a config's `train` section) adds its trainable/frozen patterns and LoRA, as training does."""
    self.model_cfg = model_cfg
    self.batch_size = batch_size
    self.mesh = sharding.make_mesh(common.mesh_config(data=-1), devices)
    sharding.check_batch_fits_mesh(batch_size, self.mesh)
    self.rules = sharding.rules_from_config(common.sharding_rules())
    self.model = state_lib.build_model(model_cfg)
    batch = example_batch(UniRESConfig.from_config(model_cfg), batch_size, seed=seed)
    trainable, frozen, extra_params_fn, params_transform = recipe_parts(train_cfg)
    abstract = state_lib.abstract_train_state(self.model, batch, None, trainable, frozen, extra_params_fn)
    abstract_params = nn.meta.unbox(abstract.params)
    self.mask = partition.trainable_mask(abstract_params, trainable, frozen)
    self.optimizer, schedule = optimizer_lib.make_optimizer(optim_config(), partition.split(abstract_params,
                                                                                               self.mask)[0])
    batch_sharding = state_lib.batch_shardings(batch, self.mesh)
    if materialize:
      self.state, self.state_shardings = state_lib.create_sharded_state(
          self.model, batch, self.mesh, self.rules, jax.random.key(seed), self.optimizer, trainable, frozen,
          extra_params_fn)
      self.batch = {k: jax.device_put(v, batch_sharding[k]) for k, v in batch.items()}
    else:  # shapes and shardings only: enough to lower and compile, nothing allocated or initialised
      abstract = state_lib.abstract_train_state(self.model, batch, self.optimizer, trainable, frozen,
                                                extra_params_fn)
      self.state_shardings = nn.meta.unbox(sharding.logical_to_shardings(abstract, self.mesh, self.rules))
      self.state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.meta.unbox(abstract), self.state_shardings)
      self.batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding[k]) for k, v in batch.items()}
    self.param_count = partition.count(self.state.params)
    self.trainable_count = partition.count(partition.split(self.state.params, self.mask)[0])
    self.rng = jax.random.key(seed + 1)
    replicated = NamedSharding(self.mesh, P())
    train_step = step_lib.make_train_step(self.model, self.optimizer, self.mask, LOSS_WEIGHTS, schedule,
                                          params_transform)
    model = self.model

    def forward(params, batch):
      return model.apply({"params": params_transform(params)}, batch, train=False)

    self.forward = jax.jit(forward, in_shardings=(self.state_shardings.params, batch_sharding))
    self.train_step = jax.jit(train_step, in_shardings=(self.state_shardings, batch_sharding, replicated),
                              out_shardings=(self.state_shardings, replicated),
                              donate_argnums=(0,) if donate_state else ())

  def context(self):
    """The mesh and logical-axis rules every trace of the model runs under."""
    return _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))

  def compile_forward(self) -> tuple[Any, float]:
    with self.context():
      start = time.perf_counter()
      compiled = self.forward.lower(self.state.params, self.batch).compile()
    return compiled, time.perf_counter() - start

  def compile_train_step(self) -> tuple[Any, float]:
    with self.context():
      start = time.perf_counter()
      compiled = self.train_step.lower(self.state, self.batch, self.rng).compile()
    return compiled, time.perf_counter() - start


def recipe_parts(train_cfg: ml_collections.ConfigDict | None) -> tuple:
  """(trainable, frozen, extra_params_fn, params_transform) of a config's `train` section: everything trained and
  no LoRA when None; otherwise its patterns and, when `lora.enabled`, LoRA factors merged before every forward."""
  if train_cfg is None:
    return (".*",), (), None, lambda p: p
  trainable, frozen = tuple(train_cfg.trainable), tuple(train_cfg.frozen)
  lora_cfg = train_cfg.lora
  if not lora_cfg.enabled:
    return trainable, frozen, None, lambda p: p
  targets, rank = [tuple(t) for t in lora_cfg.targets], int(lora_cfg.rank)

  def extra(params, rng):
    return {lora_lib.LORA_KEY: lora_lib.init_lora(params, rng, targets, rank, tuple(lora_cfg.stacked_prefixes))}

  return trainable, frozen, extra, lambda p: lora_lib.merge_lora(p, float(lora_cfg.alpha), rank)


class _Both:
  """Enters two context managers in order and leaves them in reverse."""

  def __init__(self, first, second):
    self.first, self.second = first, second

  def __enter__(self):
    self.first.__enter__()
    self.second.__enter__()

  def __exit__(self, *exc):
    self.second.__exit__(*exc)
    self.first.__exit__(*exc)


def size_config(size: str, dtype: str = "float32") -> ml_collections.ConfigDict:
  model_cfg = common.model_config(size)
  model_cfg.dtype = dtype
  return model_cfg


def utilisation(flops: float, seconds: float, peak_flops_per_s: float) -> dict:
  achieved = flops / seconds if seconds > 0 else 0.0
  return dict(flops_per_s=achieved, mfu=achieved / peak_flops_per_s if peak_flops_per_s > 0 else 0.0)


def measure_size(size: str, batch_size: int, repeats: int, peak_flops_per_s: float,
                 devices: Sequence[jax.Device] | None = None) -> dict:
  """Compile time, median forward and train-step time, FLOPs and MFU of one model size."""
  setup = Setup(size_config(size), batch_size, devices=devices)
  forward, forward_compile_s = setup.compile_forward()
  train_step, train_compile_s = setup.compile_train_step()
  forward_flops = perf.compiled_flops(forward)
  train_flops = perf.compiled_flops(train_step)
  forward_s = perf.time_call(forward, setup.state.params, setup.batch, repeats=repeats)
  train_step_s = perf.time_call(train_step, setup.state, setup.batch, setup.rng, repeats=repeats)
  seq_len = int(setup.batch["input_ids"].shape[1])
  return dict(
      size=size, batch_size=batch_size, seq_len=seq_len, param_count=setup.param_count,
      llm_param_count=partition.count(setup.state.params["llm"]) if "llm" in setup.state.params else None,
      forward=dict(compile_s=forward_compile_s, step_s=forward_s, flops=forward_flops,
                   **utilisation(forward_flops, forward_s, peak_flops_per_s)),
      train_step=dict(compile_s=train_compile_s, step_s=train_step_s, flops=train_flops,
                      **utilisation(train_flops, train_step_s, peak_flops_per_s)),
  )


def measure_depth_compile(num_layers: int, scan_layers: bool, batch_size: int,
                          devices: Sequence[jax.Device] | None = None) -> dict:
  """Train-step compile time of the tiny model with `num_layers` LLM layers, scanned or unrolled."""
  model_cfg = size_config("tiny")
  model_cfg.llm.num_layers = num_layers
  model_cfg.llm.scan_layers = scan_layers
  setup = Setup(model_cfg, batch_size, materialize=False, devices=devices)
  _, compile_s = setup.compile_train_step()
  return dict(num_layers=num_layers, scan_layers=scan_layers, train_step_compile_s=compile_s,
              param_count=setup.param_count)


def parse_ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file for the figures")
  parser.add_argument("--sizes", default="tiny,small", help="comma-separated model sizes of configs/common.py")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (the median is kept)")
  parser.add_argument("--batch-sizes", default="", help="size=batch pairs overriding the defaults, e.g. small=4")
  parser.add_argument("--depths", default="2,16", help="LLM depths of the scan compile-time comparison")
  parser.add_argument("--unscanned-depths", default="16", help="depths also compiled with scan_layers=False")
  parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul giving the peak")
  parser.add_argument("--devices", type=int, default=0, help="run on the first N devices (0: all)")
  args = parser.parse_args(argv)

  devices = perf.select_devices(args.devices)
  batch_sizes = benchmark_io.parse_batch_sizes(args.batch_sizes, DEFAULT_BATCH_SIZES)
  sizes = [s for s in args.sizes.split(",") if s]
  for size in sizes:
    if size not in common.MODEL_SIZES:
      raise ValueError(f"--sizes entry {size!r} is not a model size; expected one of {common.MODEL_SIZES}")

  peak_per_device = perf.matmul_peak_flops(args.matmul_size, repeats=args.repeats)
  peak = peak_per_device * len(devices)
  print(json.dumps(dict(matmul_peak_flops_per_s=peak)), flush=True)
  results = []
  for size in sizes:
    results.append(measure_size(size, batch_sizes[size], args.repeats, peak, devices))
    print(json.dumps(results[-1]), flush=True)
  depth_compile = []
  for depth in parse_ints(args.depths):
    depth_compile.append(measure_depth_compile(depth, True, batch_sizes["tiny"], devices))
    print(json.dumps(depth_compile[-1]), flush=True)
  for depth in parse_ints(args.unscanned_depths):
    depth_compile.append(measure_depth_compile(depth, False, batch_sizes["tiny"], devices))
    print(json.dumps(depth_compile[-1]), flush=True)

  report = dict(date=datetime.date.today().isoformat(), machine=perf.machine(devices), repeats=args.repeats,
                matmul_size=args.matmul_size, matmul_peak_flops_per_s=peak, sizes=results,
                depth_compile=depth_compile)
  benchmark_io.write_report(args.out, report)
  return report


if __name__ == "__main__":
  cli.run_main(main, "benchmark_model.py")
