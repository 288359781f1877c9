"""HF `CLIPVisionModel` state dict ↔ `ClipVisionTransformer` params (one declarative table, both directions).

`vision_model.post_layernorm` is kept as a parameter (it feeds only the pooled output, not the LLaVA features) so
an exported state dict loads into `CLIPVisionModel` with `strict=True` and a round trip is bit-exact.
q/k/v/out projections are reshaped between torch's `[D, D]` and the per-head `[D, H, Dh]` / `[H, Dh, D]` kernels.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unires_jax.convert import mapping
from unires_jax.convert.common import tensor_to_numpy
from unires_jax.convert.hf_configs import clip_vit_config_to_hf  # noqa: F401  (re-exported)
from unires_jax.models.clip_vit import ClipVisionTransformer, ClipVitConfig

# CLIP checkpoints on disk (and LLaVA's vision towers) name the tower `vision_model.`; transformers 5 drops that
# prefix in `CLIPVisionModel.state_dict()` (and adds it back when loading), so it is an argument here.
PREFIX = "vision_model."


# The tower's own top-level names, as transformers 5 writes them without the prefix.
TOWER_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def clip_vision_prefix(names, where: str) -> str:
  """The prefix the CLIP vision tower's tensors carry in a checkpoint: `vision_model.` (CLIPModel, LLaVA towers,
  CLIPVisionModel before transformers 5) or none (CLIPVisionModel saved by transformers 5). A KeyError naming
  the prefixes found when neither layout is there."""
  names = list(names)
  if any(n.startswith(PREFIX + "embeddings.") for n in names):
    return PREFIX
  if any(n.startswith("embeddings.") for n in names) and any(n.startswith("encoder.") for n in names):
    return ""
  found = sorted({n.split(".", 1)[0] + "." for n in names})
  raise KeyError(f"{where}: no CLIP vision tower found: expected tensors under {PREFIX!r} (CLIPModel, "
                 f"CLIPVisionModel of transformers < 5) or {TOWER_ROOTS[0]!r} and {TOWER_ROOTS[1]!r} "
                 f"(CLIPVisionModel of transformers 5); found the prefixes {found[:10]}")


def _head_entries(cfg: ClipVitConfig, layer: str) -> list[mapping.Entry]:
  heads, head_dim, width = cfg.num_heads, cfg.head_dim, cfg.width
  out = []
  for name in ("q_proj", "k_proj", "v_proj"):
    out.append(mapping.Entry.make(
        f"layers/self_attn/{name}/kernel", f"{layer}self_attn.{name}.weight",
        lambda w: np.ascontiguousarray(w.T.reshape(width, heads, head_dim)),      # [D, D] → [D, H, Dh]
        lambda k: np.ascontiguousarray(k.reshape(width, heads * head_dim).T), stacked=True))
    out.append(mapping.Entry.make(
        f"layers/self_attn/{name}/bias", f"{layer}self_attn.{name}.bias",
        lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(heads * head_dim), stacked=True))
  out.append(mapping.Entry.make(
      "layers/self_attn/out_proj/kernel", f"{layer}self_attn.out_proj.weight",
      lambda w: np.ascontiguousarray(w.T.reshape(heads, head_dim, width)),        # [D, D] → [H, Dh, D]
      lambda k: np.ascontiguousarray(k.reshape(heads * head_dim, width).T), stacked=True))
  out.append(mapping.Entry.make("layers/self_attn/out_proj/bias", f"{layer}self_attn.out_proj.bias", stacked=True))
  return out


def clip_vit_table(cfg: ClipVitConfig, prefix: str = PREFIX) -> list[mapping.Entry]:
  """The JAX path ↔ HF name table for one config (head reshapes depend on it)."""
  layer = prefix + "encoder.layers.{i}."
  return ([mapping.Entry.make("class_embedding", prefix + "embeddings.class_embedding"),
           mapping.Entry.make("patch_embedding/kernel", prefix + "embeddings.patch_embedding.weight",
                              mapping.conv_to_jax, mapping.conv_to_torch),
           mapping.Entry.make("position_embedding", prefix + "embeddings.position_embedding.weight")]
          + mapping.norm("pre_layrnorm", prefix + "pre_layrnorm")
          + mapping.norm("layers/layer_norm1", layer + "layer_norm1", stacked=True)
          + _head_entries(cfg, layer)
          + mapping.norm("layers/layer_norm2", layer + "layer_norm2", stacked=True)
          + mapping.linear("layers/mlp/fc1", layer + "mlp.fc1", stacked=True)
          + mapping.linear("layers/mlp/fc2", layer + "mlp.fc2", stacked=True)
          + mapping.norm("post_layernorm", prefix + "post_layernorm"))


def param_shapes(cfg: ClipVitConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{path: shape}` of the module's params, without allocating them."""
  module = ClipVisionTransformer(cfg)
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)
  return {path: tuple(leaf.shape)
          for path, leaf in mapping.flatten_params(nn.meta.unbox(abstract)["params"]).items()}


def import_clip_vit(state_dict: Mapping[str, np.ndarray], cfg: ClipVitConfig, prefix: str = PREFIX) -> dict:
  """HF CLIP vision state dict (numpy or torch tensors) → the `params` tree of `ClipVisionTransformer`.

  Only tensors under `prefix` are read (a full `CLIPModel` checkpoint also holds the text tower and the
  projections); among them the import is strict: an unmapped or missing tensor, or one whose shape does not fit
  `cfg`, raises naming it. Pass `prefix=""` for transformers 5's `CLIPVisionModel.state_dict()`.
  """
  state_dict = {name: tensor_to_numpy(value) for name, value in state_dict.items() if name.startswith(prefix)}
  if not state_dict:
    raise KeyError(f"CLIPVisionModel checkpoint: no tensor starts with prefix {prefix!r}")
  flat, _ = mapping.import_params(clip_vit_table(cfg, prefix), state_dict, num_layers=cfg.depth,
                                  expected=param_shapes(cfg), what="CLIPVisionModel checkpoint")
  return mapping.unflatten_params(flat)


def export_clip_vit(params: Mapping, cfg: ClipVitConfig, prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """`ClipVisionTransformer` params (boxed or not) → HF CLIP vision state dict of numpy arrays, names under
  `prefix` (the default is the on-disk layout `CLIPVisionModel.from_pretrained` reads)."""
  flat = {path: np.asarray(value) for path, value in mapping.flatten_params(nn.meta.unbox(params)).items()}
  return mapping.export_params(clip_vit_table(cfg, prefix), flat)


