"""Conversion time and peak memory per model size, and the forward pass in JAX and PyTorch side by side.

    python scripts/benchmark_convert.py --sizes small,1b --out /tmp/convert_benchmark.json

For each size: random params (from `jax.eval_shape`, filled on the host) → parts written in their upstream
layouts → `import_pretrained` (streaming) → `convert_to_pytorch`; then one teacher-forced forward (batch 1) of the
same weights in JAX (jitted, compile excluded) and in `UniRESTorch`. Peak memory is the process's max RSS growth
during each step (`resource.getrusage`, so it only grows; steps are run in increasing order of expected peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from configs import unires_7b  # noqa: E402
from unires_jax import benchmark_io, cli  # noqa: E402
from unires_jax.convert import export, mapping, pretrained  # noqa: E402
from unires_jax.convert import unires as convert_unires  # noqa: E402
from unires_jax.convert.clip_vit import export_clip_vit  # noqa: E402
from unires_jax.convert.convnext import export_convnext  # noqa: E402
from unires_jax.convert.llama import export_llama  # noqa: E402
from unires_jax.convert.sam import export_sam_decoder  # noqa: E402
from unires_jax.models.example_batch import example_batch  # noqa: E402
from unires_jax.models.unires import UniRES, UniRESConfig  # noqa: E402


def _max_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn):
  rss_before, start = _max_rss_mib(), time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start, _max_rss_mib() - rss_before


def benchmark_size(size: str, workdir: str, repeats: int) -> dict:
  config = unires_7b.get_config(size)
  config.model.dtype = "float32"  # CPU: compare both frameworks in float32
  config.mesh.fsdp, config.mesh.data = 1, -1
  cfg = UniRESConfig.from_config(config.model)
  rng = np.random.default_rng(0)
  shapes = convert_unires.param_shapes(cfg)
  params = mapping.unflatten_params({p: (rng.standard_normal(s, dtype=np.float32) * 0.02
                                         + (1.0 if p.endswith("/scale") else 0.0)).astype(np.float32)
                                     for p, s in sorted(shapes.items())})
  num_params = int(sum(np.prod(s) for s in shapes.values()))
  parts = {"llm": export_llama(params["llm"], cfg.llm), "vision_tower": export_clip_vit(params["vision_low"], cfg.vit),
           "convnext": export_convnext(params["vision_high"], cfg.convnext),
           "sam": export_sam_decoder(params["mask_decoder"], cfg.mask_decoder)}
  sources = {}
  for name, state_dict in parts.items():
    sources[name] = os.path.join(workdir, f"{size}_{name}.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, sources[name])
  del parts
  report, import_s, import_rss = _timed(lambda: pretrained.import_pretrained(
      config, os.path.join(workdir, f"{size}_init"), sources))
  out = os.path.join(workdir, f"{size}_torch")
  _, export_s, export_rss = _timed(lambda: export.convert_to_pytorch(params, config, out))

  batch = example_batch(cfg, 1, seed=0)
  forward = jax.jit(UniRES(cfg).apply)
  device_params = jax.tree.map(jnp.asarray, params)
  device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  jax.block_until_ready(forward({"params": device_params}, device_batch))
  start = time.perf_counter()
  for _ in range(repeats):
    jax_out = jax.block_until_ready(forward({"params": device_params}, device_batch))
  jax_s = (time.perf_counter() - start) / repeats
  del device_params, params

  import torch

  from unires_jax.convert.torch_model import UniRESTorch
  model = UniRESTorch.from_exported(out)
  torch_batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  with torch.no_grad():
    torch_out = model(torch_batch)
    start = time.perf_counter()
    for _ in range(repeats):
      model(torch_batch)
  torch_s = (time.perf_counter() - start) / repeats
  return {
      "size": size, "num_params": num_params,
      "import_s": import_s, "import_peak_rss_growth_mib": import_rss,
      "import_s_per_100m_params": import_s / num_params * 1e8,
      "export_s": export_s, "export_peak_rss_growth_mib": export_rss,
      "export_s_per_100m_params": export_s / num_params * 1e8,
      "imported_tensors": report["num_imported_tensors"], "initialised_tensors": report["num_initialised_tensors"],
      "forward_jax_s": jax_s, "forward_torch_s": torch_s,
      "max_abs_diff_logits": float(np.abs(np.asarray(jax_out["logits"]) - torch_out["logits"].numpy()).max()),
      "max_abs_diff_mask_logits": float(np.abs(np.asarray(jax_out["mask_logits"])
                                               - torch_out["mask_logits"].numpy()).max()),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="small,1b", help="comma-separated sizes of configs/unires_7b.py")
  parser.add_argument("--repeats", type=int, default=2, help="timed forward passes per framework")
  parser.add_argument("--out", required=True, help="JSON file for the results")
  args = parser.parse_args(argv)
  results = {"devices": str(jax.devices()), "cpu_count": os.cpu_count(), "runs": []}
  with tempfile.TemporaryDirectory() as workdir:
    for size in args.sizes.split(","):
      results["runs"].append(benchmark_size(size, workdir, args.repeats))
      print(json.dumps(results["runs"][-1], indent=1), flush=True)
      benchmark_io.write_report(args.out, results)


if __name__ == "__main__":
  cli.run_main(main, "benchmark_convert.py")
