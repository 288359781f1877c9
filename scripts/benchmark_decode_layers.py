"""JAX greedy decoding, `decode_layers="unstacked"` against `"scan"`: same random LLaMA (1024 wide, 8 layers),
160-token prompt, 1 and 33 new tokens, alternating repeats; prints total and per-token medians and whether tokens agree.

    python scripts/benchmark_decode_layers.py
"""
import dataclasses, time, os, jax, jax.numpy as jnp, numpy as np
from unires_jax.models import llm
cfg = llm.LlamaConfig(vocab_size=8000, hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=128,
                      mlp_dim=2816, max_seq_len=256, remat_policy="none")
model = llm.Llama(cfg)
ids = jnp.asarray(np.random.default_rng(0).integers(0, 8000, (1, 160)), jnp.int32); mask = jnp.ones(ids.shape, bool)
params = jax.jit(lambda r: model.init(r, ids, mask, method=llm.Llama.token_logits)["params"])(jax.random.key(0))
fns = {}
for mode in ("unstacked", "scan"):
  m = llm.Llama(dataclasses.replace(cfg, decode_layers=mode))
  for steps in (1, 33):
    fns[mode, steps] = jax.jit(lambda p, m=m, s=steps: llm.greedy_generate(m, p, ids, mask, s)[0]).lower(params).compile()
times = {k: [] for k in fns}
for _ in range(3):
  for k, f in fns.items():
    t = time.perf_counter(); jax.block_until_ready(f(params)); times[k].append(time.perf_counter() - t)
med = {k: float(np.median(v)) for k, v in times.items()}
for mode in ("unstacked", "scan"):
  print(mode, "total 33 tokens %.3f s" % med[mode, 33], "per token after the first %.4f s" % ((med[mode, 33] - med[mode, 1]) / 32))
print("tokens equal:", bool((np.asarray(fns["unstacked", 33](params)) == np.asarray(fns["scan", 33](params))).all()), "load", os.getloadavg())
