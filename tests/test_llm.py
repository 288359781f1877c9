"""Values of the LLaMA decoder: a float64 numpy reference, masking invariants, the KV cache, scan/remat/GQA."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unires_jax import sharding
from unires_jax.models import llm, llm_attention, splash_attention

CFG = llm.LlamaConfig(vocab_size=61, hidden_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=6,
                      mlp_dim=40, rope_theta=500.0, rms_norm_eps=1e-5, max_seq_len=16, scan_layers=True,
                      remat_policy="none")


@functools.cache
def _abstract_params(cfg: llm.LlamaConfig):
  """Boxed abstract params (logical names included) of `Llama(cfg)`; tracing only, nothing is computed."""
  model = llm.Llama(cfg)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda rng: model.init(rng, ids, jnp.ones((1, 1), bool), method=llm.Llama.token_logits),
                        jax.random.key(0))["params"]


def _init(cfg: llm.LlamaConfig, seed: int = 0) -> dict:
  """Random params in the tree of `Llama(cfg)`, norm scales away from 1 so a missing scale would show.

  Filled in numpy from the abstract tree: running the module's own init op by op costs more than the tests.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "scale":
      value = 1.0 + 0.3 * rng.normal(size=leaf.shape)
    elif path[-1].key == "embedding":
      value = rng.normal(size=leaf.shape)
    else:
      value = 0.3 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(_abstract_params(cfg)))


@functools.cache
def _jitted_logits(cfg: llm.LlamaConfig):
  model = llm.Llama(cfg)
  return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask,
                                                       method=llm.Llama.token_logits))


def _logits(cfg, params, ids, mask):
  return _jitted_logits(cfg)(params, jnp.asarray(ids), jnp.asarray(mask))


def _tokens(seed, shape, vocab=CFG.vocab_size):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# ---------------------------------------------------------------- numpy reference (float64)

def _rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):  # x [B, L, N, Dh]
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (np.arange(0, 2 * half, 2) / (2 * half))
  angles = positions[..., None] * inv_freq
  angles = np.concatenate([angles, angles], -1)[:, :, None, :]
  rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * np.cos(angles) + rotated * np.sin(angles)


def _reference_logits(cfg, params, ids, mask):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embed_tokens"]["embedding"][ids]  # [B, L, D]
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  length = ids.shape[1]
  allowed = np.tril(np.ones((length, length), bool))[None] & mask[:, None, :]  # [B, L, S]
  groups = cfg.num_heads // cfg.num_kv_heads
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda a: a[i], p["layers"])
    attn = layer["self_attn"]
    h = _rms_norm(x, layer["input_layernorm"]["scale"], cfg.rms_norm_eps)
    q = _rope(np.einsum("bld,dhk->blhk", h, attn["q_proj"]["kernel"]), positions, cfg.rope_theta)
    k = _rope(np.einsum("bld,dhk->blhk", h, attn["k_proj"]["kernel"]), positions, cfg.rope_theta)
    v = np.einsum("bld,dhk->blhk", h, attn["v_proj"]["kernel"])
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # query head h reads kv head h // groups
    scores = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(allowed[:, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bhls,bshk->blhk", probs, v)
    x = x + np.einsum("blhk,hkd->bld", attended, attn["o_proj"]["kernel"])
    h = _rms_norm(x, layer["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    mlp = layer["mlp"]
    gate = h @ mlp["gate_proj"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
  x = _rms_norm(x, p["norm"]["scale"], cfg.rms_norm_eps)
  head = p["embed_tokens"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
  return x @ head


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_numpy_reference(tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  params = _init(cfg)
  ids = _tokens(1, (3, 7))
  # Row 0 full, row 1 right-padded, row 2 left-padded: positions follow the real-token count in all of them.
  mask = np.ones((3, 7), bool)
  mask[1, 5:] = False
  mask[2, :2] = False
  got = np.asarray(_logits(cfg, params, ids, mask))
  want = _reference_logits(cfg, params, ids, mask)
  real = mask
  assert got.dtype == np.float32
  # float32 against float64: summation-order noise grows with the logits' scale (tied-embedding logits reach ~21),
  # so the tolerance is 1e-6 of the largest logit, and never below 1e-5.
  scale = max(10.0, float(np.abs(want[real]).max()))
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-6 * scale)
  assert ("lm_head" in params) != tie


def test_later_tokens_never_change_earlier_logits():
  params = _init(CFG)
  ids = _tokens(2, (2, 8))
  mask = np.ones((2, 8), bool)
  base = np.asarray(_logits(CFG, params, ids, mask))
  for t in (3, 7):
    changed = ids.copy()
    changed[:, t] = (changed[:, t] + 1 + np.arange(2)) % CFG.vocab_size
    out = np.asarray(_logits(CFG, params, changed, mask))
    np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
    assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-3  # the change is visible from t on


def test_padding_does_not_change_real_positions():
  params = _init(CFG)
  ids = _tokens(3, (2, 5))
  unpadded = np.asarray(_logits(CFG, params, ids, np.ones((2, 5), bool)))
  garbage = _tokens(4, (2, 3))
  right = np.concatenate([ids, garbage], 1)
  left = np.concatenate([garbage, ids], 1)
  right_mask = np.concatenate([np.ones((2, 5), bool), np.zeros((2, 3), bool)], 1)
  left_mask = right_mask[:, ::-1].copy()
  np.testing.assert_allclose(np.asarray(_logits(CFG, params, right, right_mask))[:, :5], unpadded, atol=1e-5)
  left_out = np.asarray(_logits(CFG, params, left, left_mask))
  np.testing.assert_allclose(left_out[:, 3:], unpadded, atol=1e-5)
  assert np.isfinite(left_out).all()  # fully masked leading queries stay finite


@pytest.mark.parametrize("scan, remat", [(True, "nothing_saveable"), (False, "none")])
def test_kv_cache_decoding_equals_full_forward(scan, remat):
  """Prefill a right-padded batch of different prompt lengths, then step token by token."""
  cfg = dataclasses.replace(CFG, scan_layers=scan, remat_policy=remat)
  params = _init(cfg)
  model = llm.Llama(cfg)
  prompt_lengths, prompt_width, steps = (3, 6), 6, 4
  prompts = _tokens(5, (2, prompt_width))
  generated = _tokens(6, (2, steps))
  prompt_mask = np.arange(prompt_width)[None] < np.array(prompt_lengths)[:, None]

  @jax.jit
  def run(token_ids, mask, cache):
    logits, updated = model.apply({"params": params, "cache": cache}, token_ids, mask, None, True,
                                  method=llm.Llama.token_logits, mutable=["cache"])
    return logits, updated["cache"]

  cache = llm.init_cache(model, 2)
  prefill_logits, cache = run(prompts, prompt_mask, cache)
  step_logits = []
  for s in range(steps):
    logits, cache = run(generated[:, s:s + 1], np.ones((2, 1), bool), cache)
    step_logits.append(np.asarray(logits[:, 0]))
  for row, length in enumerate(prompt_lengths):
    sequence = np.concatenate([prompts[row, :length], generated[row]])[None]
    full = np.asarray(_logits(cfg, params, sequence, np.ones_like(sequence, bool)))[0]  # [length + steps, V]
    np.testing.assert_allclose(np.asarray(prefill_logits)[row, :length], full[:length], atol=1e-5)
    np.testing.assert_allclose(np.stack([s[row] for s in step_logits]), full[length:], atol=1e-5)
  counts = cache["decode_positions"]["num_real_tokens"]
  np.testing.assert_array_equal(np.asarray(counts), np.array(prompt_lengths) + steps)


def _stack_layers(unrolled: dict, num_layers: int) -> dict:
  layers = [unrolled[f"layers_{i}"] for i in range(num_layers)]
  stacked = {k: v for k, v in unrolled.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return stacked


def test_scan_equals_unrolled_forward_and_grads():
  unrolled_cfg = dataclasses.replace(CFG, scan_layers=False)
  unrolled = _init(unrolled_cfg)
  assert "layers_1" in unrolled and "layers" not in unrolled
  stacked = _stack_layers(unrolled, CFG.num_layers)
  ids, mask = _tokens(7, (2, 5)), np.ones((2, 5), bool)

  def loss(cfg, params):
    return jnp.mean(_logits(cfg, params, ids, mask) ** 2)

  np.testing.assert_allclose(_logits(unrolled_cfg, unrolled, ids, mask), _logits(CFG, stacked, ids, mask),
                             atol=1e-6)
  grads_unrolled = _stack_layers(jax.grad(lambda p: loss(unrolled_cfg, p))(unrolled), CFG.num_layers)
  grads_scanned = jax.grad(lambda p: loss(CFG, p))(stacked)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_unrolled, grads_scanned)


@pytest.mark.parametrize("scan, policies", [
    (True, ["nothing_saveable", "dots_with_no_batch_dims_saveable"]),
    (False, ["nothing_saveable"]),
    pytest.param(True, ["everything_saveable", "dots_saveable"], marks=pytest.mark.slow),
])
def test_remat_policies_give_identical_grads(scan, policies):
  base_cfg = dataclasses.replace(CFG, scan_layers=scan)
  params = _init(base_cfg)
  ids, mask = _tokens(8, (2, 5)), np.ones((2, 5), bool)

  def grads(policy):
    cfg = dataclasses.replace(base_cfg, remat_policy=policy)
    return jax.jit(jax.grad(lambda p: jnp.mean(_logits(cfg, p, ids, mask) ** 2)))(params)

  reference = grads("none")
  for policy in policies:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(policy), reference)


def test_grouped_query_attention_equals_mha_with_repeated_kv():
  """kv_heads < heads is the same function as full multi-head attention whose K/V heads are repeated."""
  gqa_cfg = dataclasses.replace(CFG, num_kv_heads=1)
  mha_cfg = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
  gqa = _init(gqa_cfg)
  mha = jax.tree.map(lambda x: x, gqa)
  for name in ("k_proj", "v_proj"):
    kernel = gqa["layers"]["self_attn"][name]["kernel"]  # [Ly, D, 1, Dh]
    assert kernel.shape[2] == 1
    mha["layers"]["self_attn"][name] = {"kernel": jnp.repeat(kernel, CFG.num_heads, axis=2)}
  ids, mask = _tokens(9, (2, 6)), np.ones((2, 6), bool)
  np.testing.assert_allclose(_logits(gqa_cfg, gqa, ids, mask), _logits(mha_cfg, mha, ids, mask), atol=1e-5)


def test_params_carry_logical_axis_names():
  specs = nn.get_partition_spec(_abstract_params(CFG))
  assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
  assert tuple(specs["layers"]["self_attn"]["k_proj"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
  assert tuple(specs["layers"]["self_attn"]["o_proj"]["kernel"]) == ("layers", "heads", "head_dim", "embed")
  assert tuple(specs["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
  assert tuple(specs["layers"]["input_layernorm"]["scale"]) == ("layers", "norm")
  assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


def test_init_under_mesh_and_sharded_forward_equal_unsharded():
  """The lm1b recipe: shardings from the abstract params, `jit(init, out_shardings)` and a jitted forward."""
  cfg = dataclasses.replace(CFG, vocab_size=64)
  model = llm.Llama(cfg)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ids, mask = _tokens(10, (4, 6), vocab=64), np.ones((4, 6), bool)
  param_shardings = sharding.logical_to_shardings(_abstract_params(cfg), mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, ids[:1, :1], mask[:1, :1],
                                                        method=llm.Llama.token_logits)["params"]),
                   out_shardings=param_shardings)
    params = init(jax.random.key(0))
    sharded = jax.jit(lambda p: model.apply({"params": p}, ids, mask, method=llm.Llama.token_logits))(params)
  assert params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  assert params["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  unsharded = _logits(cfg, jax.device_get(params), ids, mask)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), atol=1e-5)
  # Initialised values are finite with the scale the initialiser promises (unit-variance embedding).
  assert 0.8 < float(jnp.std(params["embed_tokens"]["embedding"])) < 1.2


def test_config_from_common_sizes():
  from configs import common
  for size in common.MODEL_SIZES:
    cfg = llm.LlamaConfig(**common.model_config(size).llm.to_dict())
    assert cfg.num_heads % cfg.num_kv_heads == 0


@pytest.mark.parametrize("change, message", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_kv_heads=8), "multiple of num_kv_heads"),
    (dict(head_dim=5), "head_dim must be even"),
    (dict(remat_policy="save_everything_please"), "remat_policy 'save_everything_please' is unknown"),
    (dict(decode_layers="loop"), "decode_layers 'loop' is unknown"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(rope_theta=0.0), "rope_theta must be > 0"),
])
def test_bad_config_is_refused_with_a_clear_error(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **change)


def test_unknown_config_key_names_it():
  with pytest.raises(TypeError, match="num_experts"):
    llm.LlamaConfig(**{**dataclasses.asdict(CFG), "num_experts": 4})


def test_wrong_input_shapes_are_named():
  params = _init(CFG)
  model = llm.Llama(CFG)
  with pytest.raises(ValueError, match="attention_mask must be"):
    model.apply({"params": params}, jnp.zeros((2, 5, CFG.hidden_size)), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="input_embeds must be"):
    model.apply({"params": params}, jnp.zeros((2, 5, 7)), jnp.ones((2, 5), bool))


def _ragged_logits_by_impl(impls, seed, length, real_ends, real_starts):
  """Decoder logits of two token rows per attention impl; row i is real on [real_starts[i], real_ends[i])."""
  params = _init(CFG)
  ids = _tokens(seed, (2, length))
  mask = np.zeros((2, length), bool)
  for row, (start, end) in enumerate(zip(real_starts, real_ends)):
    mask[row, start:end] = True
  logits = {impl: np.asarray(_logits(dataclasses.replace(CFG, attention_impl=impl), params, ids, mask))
            for impl in impls}
  return logits, mask


def test_attention_implementations_agree_with_padding_gqa_and_empty_rows():
  """`jax.nn.dot_product_attention` ('xla') against the einsum formulation, fp32: ragged padding on both sides, a
  row whose first queries see no key at all, GQA, and the same through the KV cache."""
  rng = np.random.default_rng(11)
  batch, length, heads, kv_heads, head_dim = 3, 7, 4, 2, 6
  query = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32))
  key = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32))
  value = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32))
  key_mask = np.ones((batch, length), bool)
  key_mask[0, 5:] = False  # right padding
  key_mask[1, :2] = False  # left padding: the first two queries of row 1 have no allowed key
  key_mask[2, 3] = False   # a hole in the middle
  allowed = jnp.asarray(np.tril(np.ones((length, length), bool))[None] & key_mask[:, None, :])
  outputs = {impl: np.asarray(jax.jit(functools.partial(llm_attention.attend, impl=impl, dtype=jnp.float32))(
      query, key, value, allowed)) for impl in ("einsum", "xla")}
  assert np.isfinite(outputs["xla"]).all()
  np.testing.assert_allclose(outputs["xla"], outputs["einsum"], atol=1e-5, rtol=0)

  logits, _ = _ragged_logits_by_impl(("einsum", "xla"), seed=12, length=8, real_ends=(6, 8), real_starts=(0, 3))
  np.testing.assert_allclose(logits["xla"], logits["einsum"], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="attention_impl 'flash' is unknown"):
    dataclasses.replace(CFG, attention_impl="flash")


@pytest.mark.parametrize("length", [7, 130])  # one block of its own; two 128-blocks with a padded tail
def test_splash_attention_in_interpret_mode_equals_einsum_on_real_tokens_with_grads(length):
  """Pallas' splash kernel (interpret mode off TPU) against the einsum formulation on every real query: ragged
  padding on both sides and a hole, GQA, and the gradients of a loss that reads real queries only."""
  rng = np.random.default_rng(5)
  batch, heads, kv_heads, head_dim = 3, 4, 2, 8
  query, key, value = (jnp.asarray(rng.normal(size=(batch, length, n, head_dim)).astype(np.float32))
                       for n in (heads, kv_heads, kv_heads))
  key_mask = np.ones((batch, length), bool)
  key_mask[0, length - 2:] = False  # right padding
  key_mask[1, :3] = False  # left padding
  key_mask[2, length // 2] = False  # a hole
  real = jnp.asarray(key_mask)[:, :, None, None]
  allowed = jnp.asarray(np.tril(np.ones((length, length), bool))[None] & key_mask[:, None, :])
  weights = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32))

  def loss(q, k, v, impl):
    if impl == "splash":
      out = splash_attention.attend_splash(q, k, v, jnp.asarray(key_mask), jnp.float32)
    else:
      out = llm_attention.attend(q, k, v, allowed, "einsum", jnp.float32)
    return jnp.sum(jnp.where(real, out * weights, 0.0)), out

  results = {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl=impl), argnums=(0, 1, 2),
                                              has_aux=True))(query, key, value) for impl in ("splash", "einsum")}
  (_, got), got_grads = results["splash"]
  (_, want), want_grads = results["einsum"]
  np.testing.assert_allclose(np.asarray(got)[key_mask], np.asarray(want)[key_mask], atol=2e-5, rtol=0)
  for name, g, w in zip("qkv", got_grads, want_grads):
    assert np.abs(np.asarray(w)).max() > 1e-2, name  # the loss reaches every input
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=0, err_msg=name)


def test_splash_decoder_logits_equal_xla_on_real_tokens():
  logits, mask = _ragged_logits_by_impl(("splash", "xla"), seed=13, length=9, real_ends=(7, 9), real_starts=(0, 2))
  np.testing.assert_allclose(logits["splash"][mask], logits["xla"][mask], atol=2e-5, rtol=0)


def _greedy_decode(cfg, params, prompts, prompt_mask, steps):
  model = llm.Llama(cfg)
  return jax.device_get(jax.jit(lambda p: llm.greedy_generate(model, p, prompts, prompt_mask, steps))(params))


def test_unstacked_decode_equals_scanned_decode():
  """The per-layer decode path (weights sliced once by `with_decode_layers`) gives the scan path's tokens and logits."""
  cfg = dataclasses.replace(CFG, num_layers=3, max_seq_len=20)
  params = _init(cfg, seed=3)
  prompts = jnp.asarray(_tokens(8, (2, 7)))
  prompt_mask = jnp.asarray(np.arange(7)[None] < np.array([[4], [7]]))
  tokens, logits = _greedy_decode(cfg, params, prompts, prompt_mask, steps=6)
  scan_tokens, scan_logits = _greedy_decode(dataclasses.replace(cfg, decode_layers="scan"), params, prompts,
                                            prompt_mask, steps=6)
  np.testing.assert_array_equal(tokens, scan_tokens)
  np.testing.assert_allclose(logits, scan_logits, atol=1e-5)
  # Weights prepared once for generation (stack dropped, one copy in memory) decode the same.
  prepared = llm.prepare_decode_params(params, cfg)
  assert "layers" not in prepared and len(prepared[llm.DECODE_LAYERS_KEY]) == cfg.num_layers
  assert llm.with_decode_layers(prepared, cfg) is prepared
  prepared_tokens, prepared_logits = _greedy_decode(cfg, prepared, prompts, prompt_mask, steps=6)
  np.testing.assert_array_equal(prepared_tokens, tokens)
  np.testing.assert_allclose(prepared_logits, logits, atol=1e-6)
  assert len(set(tokens.ravel().tolist())) > 1  # a constant answer would not show a wrong layer order
  # And both equal the full forward over prompt + generated tokens (greedy choice at every step).
  for row, length in enumerate((4, 7)):
    sequence = np.concatenate([np.asarray(prompts)[row, :length], tokens[row]])[None]
    full = np.asarray(_logits(cfg, params, sequence, np.ones_like(sequence, bool)))[0]
    np.testing.assert_allclose(logits[row], full[length - 1:-1], atol=1e-5)


def test_with_decode_layers_slices_each_layer_and_leaves_other_layouts_alone():
  params = _init(CFG)
  prepared = llm.with_decode_layers(params, CFG)
  assert len(prepared[llm.DECODE_LAYERS_KEY]) == CFG.num_layers
  for i, layer in enumerate(prepared[llm.DECODE_LAYERS_KEY]):
    np.testing.assert_array_equal(layer["mlp"]["up_proj"]["kernel"], params["layers"]["mlp"]["up_proj"]["kernel"][i])
  assert llm.with_decode_layers(params, dataclasses.replace(CFG, decode_layers="scan")) is params
  with pytest.raises(KeyError, match="stacked 'layers'"):
    llm.with_decode_layers({"norm": params["norm"]}, CFG)
