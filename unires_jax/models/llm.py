"""The LLaMA-family decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) with a KV cache.

Parameter names mirror transformers' `LlamaForCausalLM` so the conversion table in `convert/llama.py` is a plain
rename plus reshapes.

Padding convention (makes batched generation with different prompt lengths exact): a False entry of
`attention_mask` marks a slot that no query may attend to. Rotary positions default to the number of real tokens
before a slot (`cumsum(attention_mask) - 1`), so a row's real tokens get the positions they would have without
padding, whether the padding is on the left, on the right, or between a right-padded prompt and generated
tokens. With `decode=True` every call writes its tokens at the next free slots of a `max_seq_len` cache together
with their mask, and continues the positions from the real tokens the cache already holds. Generation therefore
prefills a right-padded prompt batch `[B, Lp]` and then steps one token at a time for all rows together; the
padded slots stay masked for the rest of the sequence.

The sizes are `LlamaConfig` (`llm_config.py`); attention, rotary positions and the KV cache are `llm_attention.py`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unires_jax.models.llm_attention import Attention, default_positions
from unires_jax.models.llm_config import LlamaConfig, REMAT_POLICIES
from unires_jax.sharding import with_logical_constraint, logical_init

Dtype = Any

HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")
# Key of the per-layer params `with_decode_layers` adds next to the stacked `layers` (and of the per-layer cache).
DECODE_LAYERS_KEY = "decode_layers"


class RMSNorm(nn.Module):
  """x / rms(x) * scale, normalised in float32 (as HF LLaMA)."""
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical_init(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


def _kernel_init(names: tuple[str, ...]) -> Callable:
  return logical_init(nn.initializers.lecun_normal(), names)

class Mlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.config

    def dense(features, names, name):
      return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=_kernel_init(names), name=name)

    gate = dense(cfg.mlp_dim, ("embed", "mlp"), "gate_proj")(hidden)  # [B, L, F]
    up = dense(cfg.mlp_dim, ("embed", "mlp"), "up_proj")(hidden)
    inner = with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(inner)


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Returns `(hidden, None)` so `nn.scan` can stack it."""
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               decode: bool = False) -> tuple[jax.Array, None]:
    cfg = self.config
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = with_logical_constraint(hidden, HIDDEN_AXES)
    normed = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kwargs)(hidden)
    hidden = hidden + Attention(cfg, name="self_attn", **kwargs)(normed, positions, attention_mask, decode)
    normed = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kwargs)(hidden)
    hidden = hidden + Mlp(cfg, name="mlp", **kwargs)(normed)
    return with_logical_constraint(hidden, HIDDEN_AXES), None


class DecodePositions(nn.Module):
  """Counts the real tokens written to the cache per row, so decoding continues each row's positions."""

  @nn.compact
  def __call__(self, attention_mask: jax.Array) -> jax.Array:
    initialized = self.has_variable("cache", "num_real_tokens")
    num_real = self.variable("cache", "num_real_tokens", jnp.zeros, (attention_mask.shape[0],), jnp.int32)
    positions = default_positions(attention_mask, num_real.value)  # [B, L]
    if initialized:
      num_real.value = num_real.value + attention_mask.astype(jnp.int32).sum(axis=1)
    return positions


class LMHead(nn.Module):
  """Untied output projection `[D, V]`; logits in float32."""
  vocab_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _kernel_init(("embed", "vocab")), (hidden.shape[-1], self.vocab_size),
                        self.param_dtype)
    return jnp.einsum("bld,dv->blv", hidden.astype(self.dtype), kernel.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class Llama(nn.Module):
  """The decoder. Methods `embed`, `__call__` (hidden states), `logits` and `token_logits` (all three; use it to
  `init`) share one parameter tree:

  `embed_tokens/embedding [V, D]`, `layers/...` (stacked, leading `layers` axis, when `scan_layers`) or
  `layers_{i}/...`, `norm/scale [D]`, `lm_head/kernel [D, V]` (absent when `tie_embeddings`).
  """
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size,
        embedding_init=logical_init(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        **kwargs)
    block = DecoderBlock
    policy_name = cfg.remat_policy
    if policy_name != "none":
      # static_argnums counts `self`: 4 is `decode`.
      block = nn.remat(block, policy=REMAT_POLICIES[policy_name], prevent_cse=not cfg.scan_layers,
                       static_argnums=(4,))
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, **kwargs)
    else:
      self.layers = [block(cfg, **kwargs) for _ in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, **kwargs)
    self.decode_positions = DecodePositions()
    if not cfg.tie_embeddings:
      self.lm_head = LMHead(cfg.vocab_size, **kwargs)

  def embed(self, token_ids: jax.Array) -> jax.Array:
    """[B, L] int → [B, L, D]."""
    return with_logical_constraint(self.embed_tokens(token_ids), HIDDEN_AXES)

  def __call__(self, input_embeds: jax.Array, attention_mask: jax.Array, positions: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
    """[B, L, D] embeddings + [B, L] bool mask → [B, L, D] hidden states after the final norm.

    Causal over slots and masked on `attention_mask == False` keys. `positions` default to the real-token count
    (see the module docstring). With `decode=True` the cache in collection 'cache' (from `init_cache`) is read
    and extended; the caller keeps the slots written over all calls within `max_seq_len` (a traced cache index
    cannot be checked under jit, and writes past the end would be clamped onto the last slots).
    """
    if input_embeds.ndim != 3 or input_embeds.shape[-1] != self.config.hidden_size:
      raise ValueError(f"Llama input_embeds must be [B, L, {self.config.hidden_size}], got {input_embeds.shape}")
    if attention_mask.shape != input_embeds.shape[:2]:
      raise ValueError(f"Llama attention_mask must be {input_embeds.shape[:2]}, got {attention_mask.shape}")
    attention_mask = attention_mask.astype(jnp.bool_)
    if decode:
      cached_positions = self.decode_positions(attention_mask)
      positions = cached_positions if positions is None else positions
    elif positions is None:
      positions = default_positions(attention_mask)
    hidden = with_logical_constraint(input_embeds.astype(self.dtype), HIDDEN_AXES)
    if decode and self.config.scan_layers and self.config.decode_layers == "unstacked":
      hidden = self._decode_unstacked(hidden, positions, attention_mask)
    elif self.config.scan_layers:
      hidden, _ = self.layers(hidden, positions, attention_mask, decode)
    else:
      for layer in self.layers:
        hidden, _ = layer(hidden, positions, attention_mask, decode)
    return with_logical_constraint(self.norm(hidden), HIDDEN_AXES)

  def _decode_unstacked(self, hidden: jax.Array, positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The stacked layers as a Python loop, each a `DecoderBlock` applied to its own params and cache.

    Params come from `params/decode_layers` (`with_decode_layers`, sliced once outside the token loop) or, when a
    caller did not add them, from static slices of the stack (same values; XLA then copies them at every call).
    The KV cache is per layer (`cache/decode_layers`, a tuple), so no step slices or restacks it either.
    """
    cfg = self.config
    block = DecoderBlock(cfg, dtype=self.dtype, param_dtype=self.param_dtype, parent=None)  # applied functionally
    if self.is_initializing():
      self.layers(hidden, positions, attention_mask, False)  # creates the stacked params (and no scan cache)
    params = nn.meta.unbox(self.variables["params"])
    layer_params = params.get(DECODE_LAYERS_KEY) or _unstack(params["layers"], cfg.num_layers)
    initialized = self.has_variable("cache", DECODE_LAYERS_KEY)
    caches = self.get_variable("cache", DECODE_LAYERS_KEY) if initialized else (None,) * cfg.num_layers
    new_caches = []
    for layer, cache in zip(layer_params, caches):
      variables = {"params": layer} if cache is None else {"params": layer, "cache": cache}
      (hidden, _), updated = block.apply(variables, hidden, positions, attention_mask, True, mutable=["cache"])
      new_caches.append(updated["cache"])
    if initialized or self.is_initializing():
      self.put_variable("cache", DECODE_LAYERS_KEY, tuple(new_caches))
    return hidden

  def token_logits(self, token_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array | None = None,
                   decode: bool = False) -> jax.Array:
    """Token ids [B, L] → float32 logits [B, L, V]: embed, decoder, head. `init` through it creates every param."""
    return self.logits(self(self.embed(token_ids), attention_mask, positions, decode))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, L, D] → float32 [B, L, V]; tied to the embedding when `tie_embeddings`."""
    if self.config.tie_embeddings:
      embedding = self.embed_tokens.embedding  # [V, D]
      logits = jnp.einsum("bld,vd->blv", hidden.astype(self.dtype), embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(hidden)
    return with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def _unstack(stacked: Any, num_layers: int) -> tuple:
  """Stacked layer params (leading `layers` axis) → a tuple of per-layer trees."""
  return tuple(jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(num_layers))


def with_decode_layers(llm_params: Any, config: LlamaConfig) -> Any:
  """`Llama` params plus per-layer copies of the stacked layers (`decode_layers`) for the unstacked decode path.

  Call it once per generation, outside the token loop (the copies then cost one read of the weights, and the
  decode steps read each layer's weights in place), and pass the result as the `Llama` params of every
  `decode=True` call. Unchanged when the layers are not stacked or `config.decode_layers` is "scan".
  """
  if not config.scan_layers or config.decode_layers != "unstacked":
    return llm_params
  if DECODE_LAYERS_KEY in llm_params and "layers" not in llm_params:  # `prepare_decode_params` ran already
    return llm_params
  if "layers" not in llm_params:
    raise KeyError(f"with_decode_layers: the Llama params have no stacked 'layers' (keys {sorted(llm_params)})")
  return {**llm_params, DECODE_LAYERS_KEY: _unstack(llm_params["layers"], config.num_layers)}


def prepare_decode_params(llm_params: Any, config: LlamaConfig) -> Any:
  """`with_decode_layers` without the stack: params for generation only, prepared once (e.g. after loading) so that
  no generate call copies the weights again and memory holds one copy. Generation-only: training reads the stack."""
  prepared = with_decode_layers(llm_params, config)
  if prepared is llm_params:
    return llm_params
  return {key: value for key, value in prepared.items() if key != "layers"}


def init_cache(model: Llama, batch_size: int) -> Any:
  """An empty KV cache for `batch_size` rows (shapes from `jax.eval_shape`; no parameters are materialised)."""
  cfg = model.config

  def init(rng):
    embeds = jnp.zeros((batch_size, 1, cfg.hidden_size), model.dtype)
    return model.init(rng, embeds, jnp.ones((batch_size, 1), jnp.bool_), decode=True)["cache"]

  shapes = jax.eval_shape(init, jax.random.key(0))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def greedy_generate(model: Llama, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    steps: int) -> tuple[jax.Array, jax.Array]:
  """Greedy decoding with the KV cache: prefill right-padded prompts [B, Lp], then `steps` tokens for all rows.

  Returns the new tokens [B, steps] and the logits that chose them [B, steps, V]. Jit-able (`steps` static); the
  weights are unstacked once here (`with_decode_layers`), outside the token loop.
  """
  cfg = model.config
  if prompt_ids.shape[1] + steps > cfg.max_seq_len:
    raise ValueError(f"prompt length {prompt_ids.shape[1]} + {steps} steps exceeds max_seq_len {cfg.max_seq_len}")
  params = with_decode_layers(params, cfg)
  call = functools.partial(model.apply, method=Llama.token_logits, mutable=["cache"])
  last = jnp.sum(prompt_mask.astype(jnp.int32), axis=1) - 1  # [B]

  def prefill(module: Llama) -> jax.Array:  # the head runs on each row's last prompt token only
    hidden = module(module.embed(prompt_ids), prompt_mask, None, True)  # [B, Lp, D]
    return module.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]  # [B, V]

  first_logits, variables = model.apply({"params": params, "cache": init_cache(model, prompt_ids.shape[0])},
                                        method=prefill, mutable=["cache"])

  def step(carry, _):
    cache, chosen_logits = carry
    token = jnp.argmax(chosen_logits, axis=-1).astype(jnp.int32)  # [B]
    next_logits, updated = call({"params": params, "cache": cache}, token[:, None],
                                jnp.ones((token.shape[0], 1), jnp.bool_), None, True)
    return (updated["cache"], next_logits[:, 0]), (token, chosen_logits)

  _, (tokens, chosen) = jax.lax.scan(step, (variables["cache"], first_logits), None, length=steps)
  return tokens.T, jnp.swapaxes(chosen, 0, 1)
