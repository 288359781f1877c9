"""JAX against PyTorch on the same CPU, module by module, with the same weights.

Each module is a random HF transformers module whose weights reach JAX through the project's own import
(`unires_jax.convert`); the whole UniRES forward goes the other way (random JAX params exported to the PyTorch
reimplementation, `unires_jax.torch_model`). Per module: max-abs difference of the outputs, JAX compile time,
medians of JAX and PyTorch (repeats alternate between the two, so machine load hits both alike), the ratio
(PyTorch time ÷ JAX time: above 1 means JAX is faster) and the achieved FLOP/s (FLOPs counted on the PyTorch side by `torch.utils.flop_counter` ÷ time) as a
share of a 4096² float32 matmul measured in the same run. The load average is recorded with the figures.

    python scripts/benchmark_vs_torch.py --preset small                      # a few minutes
    python scripts/benchmark_vs_torch.py --preset paper --modules convnext,mask_decoder
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from unires_jax import benchmark_io, cli, perf, xla_defaults  # noqa: E402
from unires_jax.convert import clip_vit as clip_convert  # noqa: E402
from unires_jax.convert import convnext as convnext_convert  # noqa: E402
from unires_jax.convert import llama as llama_convert  # noqa: E402
from unires_jax.convert import sam as sam_convert  # noqa: E402
from unires_jax.models import llm  # noqa: E402
from unires_jax.models.clip_vit import ClipVisionTransformer, ClipVitConfig  # noqa: E402
from unires_jax.models.convnext import ConvNeXt, ConvNextConfig  # noqa: E402
from unires_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig  # noqa: E402
from unires_jax.registry import Registry  # noqa: E402

MATMUL_SIZE = 4096
MARKER_BEGIN, MARKER_END = "<!-- vs_torch:begin -->", "<!-- vs_torch:end -->"

# Sizes per preset. "paper": the shapes of the 7B recipe's modules (and a ≈0.85B LLaMA); "small": the same
# modules shrunk so the whole comparison runs in a few minutes.
PRESETS = {
    "paper": dict(
        clip=ClipVitConfig(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096),
        convnext=ConvNextConfig(image_size=1024, depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536),
                                layer_norm_eps=1e-6, layer_scale_init=1e-6),
        llama=llm.LlamaConfig(vocab_size=32000, hidden_size=2048, num_layers=14, num_heads=16, num_kv_heads=16,
                              head_dim=128, mlp_dim=5504, max_seq_len=1024, remat_policy="none"),
        mask_decoder=MaskDecoderConfig(transformer_dim=256, depth=2, num_heads=8, mlp_dim=2048,
                                       attention_downsample_rate=2, num_multimask_outputs=3, iou_head_depth=3,
                                       iou_head_hidden_dim=256, layer_norm_eps=1e-6),
        grid=64, prompt_len=640, new_tokens=32),
    "small": dict(
        clip=ClipVitConfig(image_size=112, patch_size=14, width=256, depth=4, num_heads=4, mlp_dim=1024),
        convnext=ConvNextConfig(image_size=256, depths=(1, 1, 3, 1), dims=(48, 96, 192, 384), layer_norm_eps=1e-6,
                                layer_scale_init=1e-6),
        llama=llm.LlamaConfig(vocab_size=8000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                              head_dim=64, mlp_dim=1376, max_seq_len=256, remat_policy="none"),
        mask_decoder=MaskDecoderConfig(transformer_dim=128, depth=2, num_heads=4, mlp_dim=512,
                                       attention_downsample_rate=2, num_multimask_outputs=3, iou_head_depth=3,
                                       iou_head_hidden_dim=128, layer_norm_eps=1e-6),
        grid=32, prompt_len=160, new_tokens=16),
}


@dataclasses.dataclass
class Pair:
  """One comparison: a jitted JAX function and a PyTorch function of the same weights, with their inputs."""
  name: str
  shape: str
  jax_fn: Callable  # jitted; called with `jax_args`
  jax_args: tuple
  torch_fn: Callable  # called with no arguments, under no_grad
  compare: Callable[[object, object], float]  # (jax output, torch output) → max-abs difference
  extra: Callable[[object, object], dict] | None = None  # more fields from the two outputs
  count_flops: bool = True  # False where a FLOP/s share says nothing (decoding is bound by memory bandwidth)
  one_step: tuple[Callable, Callable] | None = None  # (jax on `jax_args`, torch) generating one token


def _randomise(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
  """Every tensor random (norms near one), so every weight matters and activations stay in range."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator) * scale
      param.copy_(1.0 + noise if name.endswith(("norm.weight", "layernorm.weight", "layer_norm.weight")) else noise)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _images(size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(1, size, size, 3)).astype(np.float32)  # [1, H, W, 3]


def _nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


PAIRS = Registry("benchmark_vs_torch module")


@PAIRS.register("clip")
def clip_pair(preset: dict) -> Pair:
  cfg = preset["clip"]
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip_convert.clip_vit_config_to_hf(cfg)))
  _randomise(model.eval(), 0)
  params = clip_convert.import_clip_vit(model.state_dict(), cfg, prefix="")
  images = _images(cfg.image_size, 1)
  module = ClipVisionTransformer(cfg)
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x))
  pixels = _nchw(images)
  return Pair("CLIP ViT", f"{cfg.image_size} px, width {cfg.width}, depth {cfg.depth}", fn,
              (params, jnp.asarray(images)),
              lambda: model(pixels, output_hidden_states=True).hidden_states[cfg.select_layer][:, 1:],
              lambda j, t: _max_abs(j, t.numpy()))


@PAIRS.register("convnext")
def convnext_pair(preset: dict) -> Pair:
  cfg = preset["convnext"]
  model = transformers.ConvNextModel(transformers.ConvNextConfig(**convnext_convert.convnext_config_to_hf(cfg)))
  _randomise(model.eval(), 2, scale=0.05)
  params = convnext_convert.import_convnext(model.state_dict(), cfg)
  images = _images(cfg.image_size, 3)
  module = ConvNeXt(cfg)
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x),
               compiler_options=xla_defaults.compiler_options(cfg.image_size))
  pixels = _nchw(images)
  return Pair("ConvNeXt", f"{cfg.image_size} px, dims {list(cfg.dims)}, depths {list(cfg.depths)}", fn,
              (params, jnp.asarray(images)),
              lambda: model(pixels, output_hidden_states=True).hidden_states[1:],
              lambda j, t: max(_max_abs(a, b.numpy().transpose(0, 2, 3, 1)) for a, b in zip(j, t)))


def _llama_torch(cfg: llm.LlamaConfig):
  hf_config = transformers.LlamaConfig(**llama_convert.llama_config_to_hf(cfg), attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_config).eval()
  _randomise(model, 4)
  with torch.no_grad():
    model.model.embed_tokens.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
  return model, llama_convert.import_llama(model.state_dict(), cfg)


def _prompt(cfg: llm.LlamaConfig, length: int) -> np.ndarray:
  return np.random.default_rng(6).integers(0, cfg.vocab_size, (1, length)).astype(np.int32)  # [1, L]


@PAIRS.register("llama")
def llama_pair(preset: dict) -> Pair:
  cfg, length = preset["llama"], preset["prompt_len"]
  model, params = _llama_torch(cfg)
  ids = _prompt(cfg, length)
  module = llm.Llama(cfg)
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x, jnp.ones(x.shape, bool), method=llm.Llama.token_logits))
  torch_ids = torch.from_numpy(ids.astype(np.int64))
  return Pair("LLaMA → logits", f"{length} tokens, hidden {cfg.hidden_size}, {cfg.num_layers} layers", fn,
              (params, jnp.asarray(ids)), lambda: model(input_ids=torch_ids, use_cache=False).logits,
              lambda j, t: _max_abs(j, t.numpy()))


@PAIRS.register("decode")
def decode_pair(preset: dict) -> Pair:
  """Greedy decoding with the KV cache (the project's `greedy_generate` against HF `generate`)."""
  cfg, length, steps = preset["llama"], preset["prompt_len"], preset["new_tokens"]
  model, params = _llama_torch(cfg)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  ids = jnp.asarray(_prompt(cfg, length))
  mask = jnp.ones(ids.shape, bool)
  module = llm.Llama(cfg)
  torch_ids = torch.from_numpy(np.asarray(ids).astype(np.int64))

  def jax_generate(count):
    return jax.jit(lambda p: llm.greedy_generate(module, p, ids, mask, count)[0])

  def generate(count=steps):
    return model.generate(input_ids=torch_ids, attention_mask=torch.ones_like(torch_ids), max_new_tokens=count,
                          min_new_tokens=count, do_sample=False)[:, length:]

  def extra(jax_tokens, torch_tokens):
    equal = int((np.asarray(jax_tokens) == torch_tokens.numpy()).sum())
    return dict(tokens_equal=equal, tokens=steps)

  one = jax_generate(1)
  # The per-layer decode weights are prepared once, as after loading a checkpoint for generation; PyTorch's live in
  # its modules.
  decode_params = llm.prepare_decode_params(params, cfg)
  return Pair("greedy decode", f"{length}-token prompt + {steps} new tokens, same LLaMA", jax_generate(steps),
              (decode_params,), generate, lambda j, t: float(np.max(np.asarray(j) != t.numpy())), extra=extra,
              count_flops=False, one_step=(one, lambda: generate(1)))


@PAIRS.register("mask_decoder")
def mask_decoder_pair(preset: dict) -> Pair:
  cfg, grid = preset["mask_decoder"], preset["grid"]
  dim = cfg.transformer_dim
  sam = transformers.SamModel(transformers.SamConfig(
      vision_config=transformers.SamVisionConfig(hidden_size=16, output_channels=dim, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=grid * 16, patch_size=16,
                                                 window_size=2, global_attn_indexes=[0], mlp_dim=32,
                                                 num_pos_feats=dim // 2),
      prompt_encoder_config=transformers.SamPromptEncoderConfig(hidden_size=dim, image_size=grid * 16,
                                                                patch_size=16, mask_input_channels=8),
      mask_decoder_config=transformers.SamMaskDecoderConfig(
          hidden_size=dim, mlp_dim=cfg.mlp_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
          attention_downsample_rate=cfg.attention_downsample_rate, num_multimask_outputs=cfg.num_multimask_outputs,
          iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
          layer_norm_eps=cfg.layer_norm_eps))).eval()
  _randomise(sam, 7, scale=0.1)
  params = sam_convert.import_sam_decoder(sam.state_dict(), cfg)
  rng = np.random.default_rng(8)
  embeddings = rng.normal(size=(1, grid, grid, dim)).astype(np.float32)  # [1, G, G, D]
  sparse = rng.normal(size=(1, 1, dim)).astype(np.float32)  # [1, 1, D]: one [SEG] prompt
  fn = jax.jit(lambda p, e, s: MaskDecoder(cfg).apply({"params": p}, e, s, False)[0])
  with torch.no_grad():
    image_pe = sam.get_image_wide_positional_embeddings()
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, grid, grid)
  torch_embeddings = torch.from_numpy(embeddings).permute(0, 3, 1, 2)
  torch_sparse = torch.from_numpy(sparse)[:, None]

  def decode():
    return sam.mask_decoder(image_embeddings=torch_embeddings, image_positional_embeddings=image_pe,
                            sparse_prompt_embeddings=torch_sparse, dense_prompt_embeddings=dense,
                            multimask_output=False)[0][:, 0]

  return Pair("SAM mask decoder", f"{grid}×{grid}×{dim} image embedding, one prompt", fn,
              (params, jnp.asarray(embeddings), jnp.asarray(sparse)), decode, lambda j, t: _max_abs(j, t.numpy()))


@PAIRS.register("unires")
def unires_pair(preset: dict) -> Pair:
  """The whole forward (vision, flow, LLM, mask decoder): random JAX params exported to the PyTorch model."""
  import tempfile

  from configs import tiny
  from unires_jax.convert import export, mapping, torch_model, unires as convert_unires
  from unires_jax.models.example_batch import example_batch
  from unires_jax.models.unires import UniRES, UniRESConfig

  config = tiny.get_config()
  cfg = UniRESConfig.from_config(config.model)
  rng = np.random.default_rng(9)
  flat = {path: (rng.normal(0.0, 0.05, shape) + (1.0 if path.endswith("/scale") else 0.0)).astype(np.float32)
          for path, shape in sorted(convert_unires.param_shapes(cfg).items())}
  params = mapping.unflatten_params(flat)
  batch = example_batch(cfg, 1, seed=10)
  with tempfile.TemporaryDirectory() as folder:
    export.convert_to_pytorch(params, config, folder)
    model = torch_model.UniRESTorch.from_exported(folder).eval()
  module = UniRES(cfg)
  fn = jax.jit(lambda p, b: module.apply({"params": p}, b)["mask_logits"],
               compiler_options=xla_defaults.for_model_config(config.model))
  torch_batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  return Pair("whole UniRES forward", "configs/tiny.py, batch 1", fn,
              (params, {k: jnp.asarray(v) for k, v in batch.items()}), lambda: model(torch_batch)["mask_logits"],
              lambda j, t: _max_abs(j, t.numpy()))


def _torch_flops(torch_fn: Callable) -> float:
  """FLOPs of one PyTorch call (matmuls, convolutions, attention; 2 per multiply-add) by `torch.utils.flop_counter`,
  which counts every layer. XLA's own count (`cost_analysis`) counts a scanned layer stack's body once."""
  from torch.utils._python_dispatch import TorchDispatchMode
  from torch.utils.flop_counter import flop_registry

  class Count(TorchDispatchMode):  # FlopCounterMode's count without its module tracker, which refuses outputs
    total = 0                       # that are parameters (the exported model's prompt encoder returns one)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
      kwargs = kwargs or {}
      out = func(*args, **kwargs)
      count = flop_registry.get(func._overloadpacket)
      if count is not None:
        self.total += count(*args, **kwargs, out_val=out)
      return out

  with torch.no_grad(), Count() as counter:
    torch_fn()
  return float(counter.total)


def measure(pair: Pair, repeats: int, peak_flops_per_s: float) -> dict:
  """Compile, one warm-up each, then `repeats` alternating timed calls of JAX and PyTorch; medians.

  The JAX inputs (weights included) are put on the device once, as PyTorch's live in its tensors: a numpy argument
  would be copied to the device on every call."""
  jax_args = jax.block_until_ready(jax.device_put(pair.jax_args))
  start = time.perf_counter()
  compiled = pair.jax_fn.lower(*jax_args).compile()
  compile_s = time.perf_counter() - start
  flops = _torch_flops(pair.torch_fn) if pair.count_flops else 0.0
  jax_out = jax.block_until_ready(compiled(*jax_args))
  with torch.no_grad():
    torch_out = pair.torch_fn()
  jax_times, torch_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*jax_args))
    jax_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
      pair.torch_fn()
    torch_times.append(time.perf_counter() - start)
  jax_s, torch_s = float(np.median(jax_times)), float(np.median(torch_times))
  row = dict(module=pair.name, shape=pair.shape, max_abs_diff=pair.compare(jax_out, torch_out),
             jax_compile_s=compile_s, jax_s=jax_s, torch_s=torch_s, jax_s_all=jax_times, torch_s_all=torch_times,
             speed_vs_torch=torch_s / jax_s, flops=flops,
             jax_flops_share=flops / jax_s / peak_flops_per_s if flops else None,
             torch_flops_share=flops / torch_s / peak_flops_per_s if flops else None)
  if pair.extra is not None:
    row.update(pair.extra(jax_out, torch_out))
  if pair.one_step is not None:
    row.update(_per_token(pair.one_step, jax_args, row, repeats))
  return row


def _per_token(one_step: tuple[Callable, Callable], jax_args: tuple, row: dict, repeats: int) -> dict:
  """Seconds per new token after the first, (time of n tokens − time of one) ÷ (n − 1), both sides alternating."""
  jax_fn_one, torch_one = one_step
  jax_one = functools.partial(jax_fn_one, *jax_args)
  jax.block_until_ready(jax_one())  # compiles
  jax_times, torch_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jax_one())
    jax_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
      torch_one()
    torch_times.append(time.perf_counter() - start)
  steps = row["tokens"]  # set by the pair's `extra`
  jax_token = (row["jax_s"] - float(np.median(jax_times))) / (steps - 1)
  torch_token = (row["torch_s"] - float(np.median(torch_times))) / (steps - 1)
  return dict(jax_first_token_s=float(np.median(jax_times)), torch_first_token_s=float(np.median(torch_times)),
              jax_per_token_s=jax_token, torch_per_token_s=torch_token,
              per_token_speed_vs_torch=torch_token / jax_token if jax_token > 0 else None)


def markdown(report: dict) -> str:
  lines = [f"Measured {report['date']} with `{report['command']}` on {report['machine']}, {report['cpu_count']} cores "
           f"(torch {report['torch_threads']} threads, "
           f"matmul {MATMUL_SIZE}² float32 = {report['matmul_peak_flops_per_s']:.3g} FLOP/s this run, load average "
           f"{report['load_average_before'][0]:.1f} before / {report['load_average_after'][0]:.1f} after, "
           f"{report['repeats']} alternating repeats).",
           "",
           "| module | shape | max-abs diff | JAX compile (s) | JAX (s) | PyTorch (s) | JAX speed vs PyTorch | "
           "JAX FLOP/s share |",
           "|---|---|---|---|---|---|---|---|"]
  for row in report["rows"]:
    share = "—" if row["jax_flops_share"] is None else f"{row['jax_flops_share']:.2f}"
    diff = (f"{row['tokens_equal']}/{row['tokens']} tokens equal" if "tokens" in row
            else f"{row['max_abs_diff']:.1e}")
    lines.append(f"| {row['module']} | {row['shape']} | {diff} | {row['jax_compile_s']:.1f} | {row['jax_s']:.4f} | "
                 f"{row['torch_s']:.4f} | {row['speed_vs_torch']:.2f}× | {share} |")
    if "jax_per_token_s" in row:
      ratio = row["per_token_speed_vs_torch"]
      lines.append(f"| ↳ per new token | after the first | — | — | {row['jax_per_token_s']:.4f} | "
                   f"{row['torch_per_token_s']:.4f} | {'—' if ratio is None else f'{ratio:.2f}×'} | — |")
  return "\n".join(lines)


def write_markdown(path: str, table: str) -> None:
  """Replaces the text between the vs_torch markers of `path` (appends a section when they are absent)."""
  text = open(path).read() if os.path.exists(path) else ""
  block = f"{MARKER_BEGIN}\n{table}\n{MARKER_END}"
  if MARKER_BEGIN in text and MARKER_END in text:
    head, rest = text.split(MARKER_BEGIN, 1)
    text = head + block + rest.split(MARKER_END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n## JAX against PyTorch, same weights (`scripts/benchmark_vs_torch.py`)\n\n" + block
  with open(path, "w") as f:
    f.write(text.rstrip("\n") + "\n")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="module sizes")
  parser.add_argument("--modules", default=",".join(PAIRS.names()), help=f"comma-separated, of {PAIRS.names()}")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls of each side (medians kept)")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--out", default="docs/benchmarks/vs_torch.json", help="JSON file for the figures")
  parser.add_argument("--markdown", default="docs/benchmarks.md", help="Markdown file whose table is replaced; "
                      "empty to skip")
  args = parser.parse_args(argv)
  names = [n for n in args.modules.split(",") if n]
  unknown = [n for n in names if n not in PAIRS.names()]
  if unknown or args.repeats < 1:
    parser.error(f"unknown --modules {unknown}; expected some of {PAIRS.names()}" if unknown
                 else "--repeats must be at least 1")
  torch.set_num_threads(args.threads)
  load_before = os.getloadavg()
  peak = perf.matmul_peak_flops(MATMUL_SIZE, jnp.float32, repeats=3)
  rows = []
  for name in names:
    rows.append(measure(PAIRS.lookup(name)(PRESETS[args.preset]), args.repeats, peak))
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_all")}), flush=True)
  command = "python scripts/benchmark_vs_torch.py " + " ".join(argv if argv is not None else sys.argv[1:])
  report = dict(date=datetime.date.today().isoformat(), command=command.strip(), preset=args.preset,
                repeats=args.repeats, torch_threads=args.threads, jax=jax.__version__, torch=torch.__version__,
                transformers=transformers.__version__, machine=perf.cpu_description(),
                cpu_count=os.cpu_count(), load_average_before=list(load_before),
                load_average_after=list(os.getloadavg()), matmul_size=MATMUL_SIZE, matmul_peak_flops_per_s=peak,
                rows=rows)
  benchmark_io.write_report(args.out, report)
  if args.markdown:
    write_markdown(args.markdown, markdown(report))
  return report


if __name__ == "__main__":
  cli.run_main(main, "benchmark_vs_torch.py")
