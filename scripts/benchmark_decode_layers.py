"""Greedy-decoding benchmark: `decode_layers="unstacked"` (per-layer weights, `llm.prepare_decode_params`) against
`"scan"` (the training path's stacked layers) on the same random LLaMA.

For each mode it compiles generation of 1 and of `--new-tokens` tokens from one prompt, times both with repeats
alternating between the modes, and reports the medians: the whole call and the cost per token after the first
(difference of the two medians over the extra tokens). It also checks that both modes generate the same tokens.

    python scripts/benchmark_decode_layers.py --out docs/benchmarks/decode_layers.json
    python scripts/benchmark_decode_layers.py --size tiny --out /tmp/decode.json        # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from unires_jax import benchmark_io, cli  # noqa: E402
from unires_jax.models import llm  # noqa: E402

# name → (decoder sizes, prompt length); "bench" is the 1024-wide, 8-layer decoder of docs/benchmarks.md.
SIZES = {
    "bench": (llm.LlamaConfig(vocab_size=8000, hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=4,
                              head_dim=128, mlp_dim=2816, max_seq_len=256, remat_policy="none"), 160),
    "tiny": (llm.LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                             mlp_dim=64, max_seq_len=32, remat_policy="none"), 8),
}
MODES = ("unstacked", "scan")


def measure(size: str, new_tokens: int, repeats: int) -> dict:
  """Medians per mode and whether the modes' tokens agree."""
  cfg, prompt_length = SIZES[size]
  if prompt_length + new_tokens > cfg.max_seq_len:
    raise ValueError(f"--new-tokens {new_tokens} does not fit: the {size!r} decoder holds {cfg.max_seq_len} "
                     f"slots and the prompt takes {prompt_length}")
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prompt_length)), jnp.int32)  # [1, P]
  mask = jnp.ones(ids.shape, bool)
  model = llm.Llama(cfg)
  params = jax.jit(lambda r: model.init(r, ids, mask, method=llm.Llama.token_logits)["params"])(jax.random.key(0))
  weights = {"unstacked": llm.prepare_decode_params(params, cfg), "scan": params}

  compiled = {}
  for mode in MODES:
    mode_model = llm.Llama(dataclasses.replace(cfg, decode_layers=mode))
    for steps in (1, new_tokens):
      generate = jax.jit(lambda p, m=mode_model, s=steps: llm.greedy_generate(m, p, ids, mask, s)[0])
      compiled[mode, steps] = generate.lower(weights[mode]).compile()
  seconds = {key: [] for key in compiled}
  for _ in range(repeats):  # alternating, so that a slow moment of the machine hits both modes
    for (mode, steps), fn in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(weights[mode]))
      seconds[mode, steps].append(time.perf_counter() - start)
  median = {key: float(np.median(values)) for key, values in seconds.items()}
  tokens = {mode: np.asarray(compiled[mode, new_tokens](weights[mode])) for mode in MODES}
  rows = {mode: dict(total_s=median[mode, new_tokens], first_token_s=median[mode, 1],
                     per_token_s=(median[mode, new_tokens] - median[mode, 1]) / max(new_tokens - 1, 1))
          for mode in MODES}
  return dict(size=size, config=dataclasses.asdict(cfg), prompt_length=prompt_length, new_tokens=new_tokens,
              repeats=repeats, modes=rows, tokens_equal=bool((tokens["unstacked"] == tokens["scan"]).all()),
              unstacked_speedup_per_token=rows["scan"]["per_token_s"] / rows["unstacked"]["per_token_s"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="bench")
  parser.add_argument("--new-tokens", type=int, default=33)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="docs/benchmarks/decode_layers.json")
  args = parser.parse_args(argv)
  if args.new_tokens < 2 or args.repeats < 1:
    parser.error("--new-tokens must be at least 2 and --repeats at least 1")
  try:
    result = measure(args.size, args.new_tokens, args.repeats)
  except ValueError as error:
    print(f"benchmark_decode_layers: {error}", file=sys.stderr)
    return 2
  result.update(date=datetime.date.today().isoformat(), jax=jax.__version__,
                device=jax.devices()[0].device_kind, load_average=os.getloadavg(),
                command="python scripts/benchmark_decode_layers.py " + " ".join(argv or sys.argv[1:]))
  for mode, row in result["modes"].items():
    print(f"{mode:9s} {result['new_tokens']} tokens {row['total_s']:.3f} s, per token after the first "
          f"{row['per_token_s'] * 1e3:.1f} ms")
  print(f"tokens equal: {result['tokens_equal']}; unstacked per token {result['unstacked_speedup_per_token']:.2f}x "
        f"faster; written to {args.out}")
  benchmark_io.write_report(args.out, result)
  return 0 if result["tokens_equal"] else 1


if __name__ == "__main__":
  sys.exit(cli.run_main(main, "benchmark_decode_layers.py"))
