"""Proposal benchmark: images/s of the `sam` proposal source (SAM automatic mask generation in JAX), random weights.

Two SAMs: `tiny`, the test's (64 px canvas, width-32 ViT, width-32 decoder), and `vit_h`, the 7B config's SAM
ViT-H shape (`configs/common.py` `model_config("7b")`: its `sam_vit` section, 1024 px, and its mask decoder). Each
runs the source on a few synthetic images: the first call (compile included, compile time summed from JAX's own
compile-duration events), then `--repeats` timed calls whose median gives seconds per image.

    python scripts/benchmark_propose.py --out docs/benchmarks/propose.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from configs import common  # noqa: E402
from unires_jax import benchmark_io, cli, perf  # noqa: E402
from unires_jax.models.mask_decoder import MaskDecoderConfig  # noqa: E402
from unires_jax.models.sam_vit import SamVitConfig  # noqa: E402
from unires_jax.proposals import ImageInput  # noqa: E402
from unires_jax.proposals.sam import AmgOptions, SamAutomaticMasks  # noqa: E402
from unires_jax.proposals.sam_model import SamArchitecture, init_params  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
TINY = SamArchitecture(
    SamVitConfig(image_size=64, patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=64, window_size=2,
                 global_attn_indexes=(1,), out_channels=32),
    MaskDecoderConfig(transformer_dim=32, depth=2, num_heads=4, mlp_dim=64, iou_head_hidden_dim=32))
# name → (architecture, images, points per side): the defaults keep the CPU run to a few minutes.
MODELS = {
    "tiny": (lambda: TINY, 4, 16),
    "vit_h": (lambda: SamArchitecture.from_model_config(common.model_config("7b")), 1, 8),
}


@contextlib.contextmanager
def compile_seconds():
  """Yields a one-element list that holds, on exit, the seconds JAX spent tracing, lowering and compiling."""
  total = [0.0]

  def listener(event, duration, **kwargs):
    del kwargs
    if event in COMPILE_EVENTS:
      total[0] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield total
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
  """uint8 [h, w, 3]: a few flat rectangles on a background, with noise."""
  rng = np.random.default_rng(seed)
  image = np.full((height, width, 3), 40, np.int64)
  for _ in range(4):
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[y0:y0 + rng.integers(height // 8, height // 2), x0:x0 + rng.integers(width // 8, width // 2)] = \
        rng.integers(0, 256, 3)
  return np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)


def measure(name: str, arch: SamArchitecture, num_images: int, points_per_side: int, points_per_batch: int,
            height: int, width: int, repeats: int) -> dict:
  config = common.proposals_config("sam")
  config.sam.update(points_per_side=points_per_side, points_per_batch=points_per_batch)
  options = AmgOptions.from_config(config.sam)
  params = init_params(arch, jax.random.key(0))
  param_count = int(sum(np.size(p) for p in jax.tree.leaves(params)))
  source = SamAutomaticMasks(config, segmenter=SamAutomaticMasks.make_segmenter(arch, params, options),
                             weights=f"random weights ({name})")
  images = [synthetic_image(height, width, seed) for seed in range(num_images)]
  inputs = [ImageInput(image_id=i, file_name=f"synthetic_{i}.png", height=height, width=width,
                       pixels=lambda pixels=pixels: pixels) for i, pixels in enumerate(images)]
  with compile_seconds() as compiled:
    start = time.perf_counter()
    found = source(inputs)
    first_call_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    source(inputs)
    times.append(time.perf_counter() - start)
  steady_s = float(np.median(times))
  return dict(
      model=name, param_count=param_count, sam_vit=arch.to_dict()["sam_vit"],
      mask_decoder=arch.to_dict()["mask_decoder"], images=num_images, image_height=height, image_width=width,
      points_per_side=points_per_side, grid_points=points_per_side ** 2, points_per_batch=points_per_batch,
      crop_n_layers=options.crop_n_layers, data_shards=source.segmenter.num_shards,
      compile_s=compiled[0], first_call_s=first_call_s, repeats=repeats, steady_s=steady_s,
      seconds_per_image=steady_s / num_images, images_per_s=num_images / steady_s,
      kept_objects=int(sum(len(p.object_boxes) for p in found)),
      kept_parts=int(sum(len(p.part_boxes) for p in found)), source=source.describe())


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file for the figures")
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
  parser.add_argument("--images", type=int, default=0, help="images per model (0: the model's default)")
  parser.add_argument("--points-per-side", type=int, default=0, help="point grid side (0: the model's default)")
  parser.add_argument("--points-per-batch", type=int, default=64)
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first (the median is kept)")
  args = parser.parse_args(argv)
  command = "python scripts/benchmark_propose.py " + " ".join(sys.argv[1:] if argv is None else argv)
  load_before = os.getloadavg()
  names = [n for n in args.models.split(",") if n]
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f"--models: unknown {unknown}; expected some of {sorted(MODELS)}")

  results = []
  for name in names:
    build, images, points = MODELS[name]
    results.append(measure(name, build(), args.images or images, args.points_per_side or points,
                           args.points_per_batch, args.height, args.width, args.repeats))
    print(json.dumps({k: v for k, v in results[-1].items() if k not in ("sam_vit", "mask_decoder")}), flush=True)
  report = dict(date=datetime.date.today().isoformat(), machine=perf.machine(), command=command,
                load_average_1_5_15_min=dict(before=load_before, after=os.getloadavg()),
                weights="random (scripts/benchmark_propose.py; filters at the config defaults)", models=results)
  benchmark_io.write_report(args.out, report)
  return report


if __name__ == "__main__":
  cli.run_main(main, "benchmark_propose.py")
