"""The training loop: mesh, Grain pipeline, sharded state, the jitted pure step, Orbax, metrics, evaluation.

Everything stateful (I/O, checkpoints, signals, logging) lives here; `train_step` stays pure. A run resumes
from the newest readable checkpoint in `workdir/checkpoints` (model, optimizer and data-iterator state), so a
resumed run sees exactly the samples and RNG it would have seen; SIGTERM (preemption) saves before exiting.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unires_jax import perf, sharding, xla_defaults
from unires_jax.data import pipeline
from unires_jax import checkpointing as checkpoint_lib
from unires_jax.train import lora as lora_lib
from unires_jax.train import optimizer as optimizer_lib
from unires_jax.train import partition
from unires_jax.train import run_lock
from unires_jax.train import state as state_lib
from unires_jax.train import step as step_lib

log = logging.getLogger(__name__)


def resolve_workdir_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Replaces `{workdir}` in every string of the config (data locations of the toy run live in the workdir)."""
  def substitute(node):
    if isinstance(node, dict):
      return {k: substitute(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
      return type(node)(substitute(v) for v in node)
    if isinstance(node, str):
      return node.replace("{workdir}", os.path.abspath(workdir))
    return node
  return ml_collections.ConfigDict(substitute(config.to_dict()))


def check_config(config: ml_collections.ConfigDict, mesh, check_evals: Callable | None = None) -> None:
  """Stops before any work on a config that cannot run: names the key and what was expected."""
  sharding.check_batch_fits_mesh(int(config.data.batch_size), mesh, "data.batch_size")
  if config.data.batch_size % jax.process_count():
    raise ValueError(f"data.batch_size {config.data.batch_size} does not divide over {jax.process_count()} processes")
  for source in config.data.sources:
    if not os.path.isdir(source["dir"]):
      raise FileNotFoundError(f"data.sources: prepared split directory {source['dir']!r} does not exist "
                              f"(run scripts/prepare_data.py, or use configs/toy.py which generates its data)")
  if not config.data.sources:
    raise ValueError("data.sources is empty: expected at least one prepared split directory")
  if check_evals is not None:
    check_evals(config)  # e.g. the final evaluation's box policy, before any training


def _lora_fns(config):
  lora_cfg = config.train.lora
  if not lora_cfg.enabled:
    return None, lambda p: p
  targets = [tuple(t) for t in lora_cfg.targets]

  def extra(params, rng):
    return {lora_lib.LORA_KEY: lora_lib.init_lora(params, rng, targets, int(lora_cfg.rank),
                                                   tuple(lora_cfg.stacked_prefixes))}
  return extra, lambda p: lora_lib.merge_lora(p, float(lora_cfg.alpha), int(lora_cfg.rank))


class Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (save, then exit)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class MetricWriter:
  """TensorBoard event files plus a readable console line; process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    for name, value in values.items():
      self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
    self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _format_line(step: int, total: int, metrics: dict[str, float]) -> str:
  parts = [f"step {step}/{total}"]
  for key in ("loss", "ce", "bce", "dice", "lr", "grad_norm", "step_time_s", "examples_per_s", "mfu"):
    if key in metrics:
      value = metrics[key]
      parts.append(f"{key} {value:.3e}" if key == "lr" else f"{key} {value:.4f}")
  return " | ".join(parts)


def load_initial_params(path: str, fresh_params: Any, param_shardings: Any) -> Any:
  """Parameters from an imported or earlier checkpoint (`train.init_from`), placed into the run's shardings.

  Every parameter of the model must be present with its shape; LoRA factors absent from the source keep their
  fresh values. Extra or mis-shaped tensors are errors that name them.
  """
  from unires_jax.convert import checkpoints as checkpoint_io
  loaded, _ = checkpoint_io.load_params(path)
  loaded_flat = {partition.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  used = set()

  def place(key_path, fresh, target_sharding):
    name = partition.param_path(key_path)
    if name not in loaded_flat:
      if name.startswith(lora_lib.LORA_KEY + "/"):
        return fresh
      raise KeyError(f"train.init_from {path}: parameter {name!r} is missing")
    value = np.asarray(loaded_flat[name])
    if value.shape != fresh.shape:
      raise ValueError(f"train.init_from {path}: parameter {name!r} has shape {value.shape}, the model expects "
                       f"{fresh.shape}")
    used.add(name)
    return jax.device_put(value.astype(fresh.dtype), target_sharding)

  placed = jax.tree_util.tree_map_with_path(place, fresh_params, param_shardings)
  extra = sorted(set(loaded_flat) - used)
  if extra:
    raise KeyError(f"train.init_from {path}: {len(extra)} tensors are not parameters of this model, first {extra[0]!r}")
  return placed


# What the loop is handed to evaluate (unires_jax/run.py builds it from eval/): `make_evaluate(config, model,
# params_transform, mesh, rules, workdir)`, called once before the first step, returns `evaluate(params, step,
# final) -> {prefix: {metric: value}}` (or None: nothing to evaluate); `make_evaluate.check(config)` (optional)
# refuses an evaluation config before anything is built.
MakeEvaluate = Callable[..., Callable[..., dict] | None]


def train(config: ml_collections.ConfigDict, workdir: str, make_evaluate: MakeEvaluate | None = None) -> dict:
  """Runs (or resumes) training to `config.train.total_steps`; returns the last logged metrics and paths.

  The workdir is locked for the run (`run_lock`): a second trainer on it is refused before it touches anything.
  Without `make_evaluate` no evaluation runs (train/ does not import eval/).
  """
  with run_lock.hold(workdir):
    return _train(config, workdir, make_evaluate)


def _train(config: ml_collections.ConfigDict, workdir: str, make_evaluate: MakeEvaluate | None) -> dict:
  config = resolve_workdir_paths(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  sharding.check_batch_rule(rules)
  check_config(config, mesh, getattr(make_evaluate, "check", None))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  model = state_lib.build_model(config.model)
  train_cfg = config.train
  optim_cfg = ml_collections.ConfigDict(dict(config.optim.to_dict(), total_steps=int(train_cfg.total_steps)))
  extra_params_fn, params_transform = _lora_fns(config)
  example = state_lib.abstract_batch(config.model, int(config.data.batch_size), int(config.data.max_text_len))
  example = {k: np.zeros(v.shape, v.dtype) for k, v in example.items()}
  trainable, frozen = tuple(train_cfg.trainable), tuple(train_cfg.frozen)

  # The optimizer's group labels need the parameter tree: take it from the abstract state.
  abstract = state_lib.abstract_train_state(model, example, None, trainable, frozen, extra_params_fn)
  abstract_params = nn.meta.unbox(abstract.params)
  if train_cfg.get("freeze_inert", True):
    frozen += partition.matching_patterns(abstract_params, model.config.inert_parameter_patterns())
  mask = partition.trainable_mask(abstract_params, trainable, frozen)
  optimizer, schedule = optimizer_lib.make_optimizer(optim_cfg, partition.split(abstract_params, mask)[0])
  rng = jax.random.key(int(config.seed))
  init_rng, step_rng = jax.random.split(rng)
  state, state_shardings = state_lib.create_sharded_state(model, example, mesh, rules, init_rng, optimizer,
                                                          trainable, frozen, extra_params_fn)
  if jax.process_index() == 0:
    counts = partition.count(state.params), partition.count(partition.split(state.params, mask)[0])
    log.info("parameters: %s total, %s trainable", f"{counts[0]:,}", f"{counts[1]:,}")

  pipeline.ensure_toy_tokenizer(config)  # every process: a race writes the same model, renamed into place
  evaluate = make_evaluate(config, model, params_transform, mesh, rules, workdir) if make_evaluate else None
  train_iter = pipeline.make_train_iterator(config)
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=int(train_cfg.checkpoint_every),
      keep_last=int(train_cfg.keep_last), keep_every_steps=train_cfg.get("keep_every_steps") or None,
      async_save=bool(train_cfg.async_checkpoint), save_on_steps=tuple(train_cfg.get("checkpoint_steps", ())))
  abstract_sharded = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                  state_shardings)
  restored = checkpointer.restore_latest(abstract_sharded, train_iter)
  start_step = 0
  if restored is not None:
    state, start_step = restored
    log.info("resuming at step %d", start_step)
  elif train_cfg.get("init_from", ""):
    state = state.replace(params=load_initial_params(train_cfg.init_from, state.params, state_shardings.params))
    log.info("initialised parameters from %s", train_cfg.init_from)

  batch_sharding = state_lib.batch_shardings(example, mesh)
  replicated = NamedSharding(mesh, P())
  train_step = step_lib.make_train_step(model, optimizer, mask, dict(train_cfg.loss_weights), schedule,
                                        params_transform)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted_step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, replicated),
                          out_shardings=(state_shardings, replicated), donate_argnums=0,
                          compiler_options=xla_defaults.for_model_config(config.model))
    compile_start = time.perf_counter()
    compiled = jitted_step.lower(state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding[k])
                                         for k, v in example.items()}, step_rng).compile()
    compile_s = time.perf_counter() - compile_start
  flops_per_step = perf.compiled_flops(compiled)
  peak_flops = float(train_cfg.get("peak_flops_per_device", 0.0)) or perf.matmul_peak_flops(1024)
  peak_flops *= jax.device_count()
  log.info("train step compiled in %.1fs; %.3e FLOPs/step", compile_s, flops_per_step)

  writer = MetricWriter(workdir)
  preemption = Preemption()
  total = int(train_cfg.total_steps)
  progress = None
  if sys.stderr.isatty() and jax.process_index() == 0:
    from tqdm import tqdm
    progress = tqdm(total=total, initial=start_step, desc="train")
  last = {}
  window_start, window_steps = time.perf_counter(), 0
  step = start_step
  save_failed = False
  try:
    while step < total:
      local_batch = next(train_iter)
      batch = pipeline.to_global_batch(local_batch, mesh)
      state, metrics = compiled(state, batch, step_rng)
      step += 1
      window_steps += 1
      if progress is not None:
        progress.update(1)
      if step % int(train_cfg.log_every) == 0 or step == total:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = (time.perf_counter() - window_start) / window_steps
        metrics.update(step_time_s=elapsed, examples_per_s=config.data.batch_size / elapsed,
                       mfu=flops_per_step / elapsed / peak_flops if flops_per_step else 0.0)
        writer.scalars(step, metrics)
        if jax.process_index() == 0:
          log.info(_format_line(step, total, metrics))
        last = metrics
        window_start, window_steps = time.perf_counter(), 0
      saved = checkpointer.save(step, state, train_iter, force=(step == total))
      eval_every = int(train_cfg.get("eval_every", 0))
      if eval_every and step % eval_every == 0 and step < total:
        run_evals(evaluate, state.params, step, writer)
      if preemption.requested:
        log.warning("SIGTERM received: saving a checkpoint at step %d and exiting", step)
        if not saved:
          checkpointer.save(step, state, train_iter, force=True)
        break
  except checkpoint_lib.CheckpointSaveError:
    save_failed = True  # the run stops here; the error names the intact steps
    raise
  finally:
    if not save_failed:
      checkpointer.wait()
    preemption.restore()
    if progress is not None:
      progress.close()
  summary = {"step": step, "compile_s": compile_s, "flops_per_step": flops_per_step, "last_metrics": last,
             "workdir": os.path.abspath(workdir)}
  if step >= total and not preemption.requested:
    summary["evals"] = run_evals(evaluate, state.params, step, writer, final=True)
  checkpointer.close()
  writer.close()
  summary["peak_host_memory_mb"] = perf.peak_host_memory_mb()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "train_summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
  summary["state"] = state
  return summary


def run_evals(evaluate: Callable[..., dict] | None, params, step: int, writer, final: bool = False) -> dict:
  """The handed evaluation (held-out loss, registered evaluators) at `step`, logged and written as scalars."""
  if evaluate is None:
    return {}
  results = evaluate(params, step, final=final)
  for prefix, values in results.items():
    writer.scalars(step, {k: v for k, v in values.items() if isinstance(v, (int, float))}, prefix=prefix)
    if jax.process_index() == 0:
      log.info("eval %s @ step %d: %s", prefix, step,
               ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, (int, float))))
  return results
