"""The whole-model UniRES table: the per-module tables under their prefixes plus the UniRES-only parts.

PyTorch names are those of `unires_jax.convert.torch_model.UniRESTorch.state_dict()`:

| JAX params key | PyTorch prefix | layout |
|---|---|---|
| `llm` | `llm.` | transformers `LlamaForCausalLM` (`convert/llama.py`) |
| `vision_low` | `vision_tower.` | transformers 5 `CLIPVisionModel.state_dict()` (`convert/clip_vit.py`, no `vision_model.`) |
| `vision_high` | `vision_high.` | transformers `ConvNextModel` (`convert/convnext.py`; only when built) |
| `sam_vit` | `sam_vit.` | transformers `SamVisionEncoder` (`convert/sam_vit.py`; the SAM ViT dense source) |
| `mask_decoder` | `sam.` | transformers `SamModel` names of the decoder and dense prompt pieces (`convert/sam.py`) |
| `vision_flow` | `vision_flow.` | `granularity_embedding` [3, D]; `{image,object,part}_projector.fc{1,2}` Linear (`.fc` for the linear projector) |
| `seg_head` | `seg_head.` | `fc1`, `fc2` Linear |
| `visual_key_proj` | `visual_key_proj.` | Linear |
| `dynamic_query` | `dynamic_query.` | `q_proj`, `k_proj`, `v_proj`, `out_proj` Linear (heads flattened head-major) |
| `dense_neck` | `dense_neck.` | `conv1` (1×1), `conv2` (3×3) Conv2d without bias; `norm1`, `norm2` channel LayerNorms |
| `sam_dense_proj` | `sam_dense_proj.` | Linear (SAM ViT source whose width is not the decoder's) |

Parts and heads the config does not build are absent. Each part keeps its own stacked-layer count (LLaMA layers, ViT depth), so imports and exports run part by part.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np

from unires_jax.convert import mapping
from unires_jax.convert.clip_vit import clip_vit_table
from unires_jax.convert.convnext import convnext_hf_table
from unires_jax.convert.llama import llama_table
from unires_jax.convert.sam import sam_decoder_table
from unires_jax.convert.sam_vit import sam_vit_table
from unires_jax.models.unires import UniRESConfig


@dataclasses.dataclass(frozen=True)
class Part:
  """One block of the table: its entries already carry the JAX and PyTorch prefixes."""
  name: str
  entries: tuple[mapping.Entry, ...]
  num_layers: int = 0


def prefixed(entries: Iterable[mapping.Entry], jax_prefix: str, torch_prefix: str) -> list[mapping.Entry]:
  """`entries` with `jax_prefix/` before every JAX path and `torch_prefix` before every PyTorch name."""
  return [dataclasses.replace(e, jax_path=f"{jax_prefix}/{e.jax_path}" if jax_prefix else e.jax_path,
                              torch_names=tuple(torch_prefix + n for n in e.torch_names)) for e in entries]


def _heads_in_to_torch(k: np.ndarray) -> np.ndarray:
  """[D, H, Dh] → torch Linear [H*Dh, D]."""
  return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def _attention_entries(jax_prefix: str, torch_prefix: str, num_heads: int) -> list[mapping.Entry]:
  """Flax `MultiHeadDotProductAttention` (query/key/value/out) ↔ q/k/v/out_proj Linear layers."""
  def heads_in_to_jax(w):  # [H*Dh, D] → [D, H, Dh]
    return np.ascontiguousarray(w.T.reshape(w.shape[1], num_heads, w.shape[0] // num_heads))

  def heads_out_to_jax(w):  # [D, H*Dh] → [H, Dh, D]
    return np.ascontiguousarray(w.T.reshape(num_heads, w.shape[1] // num_heads, w.shape[0]))

  entries = []
  for jax_name, torch_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    entries.append(mapping.Entry.make(f"{jax_prefix}/{jax_name}/kernel", f"{torch_prefix}.{torch_name}.weight",
                                      heads_in_to_jax, _heads_in_to_torch))
    entries.append(mapping.Entry.make(f"{jax_prefix}/{jax_name}/bias", f"{torch_prefix}.{torch_name}.bias",
                                      lambda b: b.reshape(num_heads, -1), lambda b: b.reshape(-1)))
  entries.append(mapping.Entry.make(f"{jax_prefix}/out/kernel", f"{torch_prefix}.out_proj.weight",
                                    heads_out_to_jax, lambda k: np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)))
  entries.append(mapping.Entry.make(f"{jax_prefix}/out/bias", f"{torch_prefix}.out_proj.bias"))
  return entries


def heads_table(cfg: UniRESConfig) -> list[mapping.Entry]:
  """The UniRES-only parameters the config builds: vision flow projectors (and granularity embedding), seg head,
  dynamic query and its key projection, the dense neck (ConvNeXt source) or SAM's dense projection (SAM ViT source,
  only when its width differs from the decoder's)."""
  flow = cfg.vision_flow
  entries = []
  if flow.granularity_embedding:
    entries.append(mapping.Entry.make("vision_flow/granularity_embedding", "vision_flow.granularity_embedding"))
  layers = ("fc",) if flow.projector == "linear" else ("fc1", "fc2")
  groups = ("image", "object", "part") if flow.uses_region_tokens else ("image",)
  for group in groups:
    for layer in layers:
      entries += mapping.linear(f"vision_flow/{group}_projector/{layer}", f"vision_flow.{group}_projector.{layer}")
  entries += mapping.linear("seg_head/fc1", "seg_head.fc1") + mapping.linear("seg_head/fc2", "seg_head.fc2")
  if cfg.dynamic_query:
    entries += mapping.linear("visual_key_proj", "visual_key_proj")
    entries += _attention_entries("dynamic_query", "dynamic_query", cfg.mask_decoder.num_heads)
  if cfg.dense_source == "convnext":
    for conv in ("conv1", "conv2"):
      entries.append(mapping.Entry.make(f"dense_neck/{conv}/kernel", f"dense_neck.{conv}.weight",
                                        mapping.conv_to_jax, mapping.conv_to_torch))
    entries += (mapping.norm("dense_neck/norm1", "dense_neck.norm1")
                + mapping.norm("dense_neck/norm2", "dense_neck.norm2"))
  elif cfg.sam_vit.out_channels != cfg.mask_decoder.transformer_dim:
    entries += mapping.linear("sam_dense_proj", "sam_dense_proj")
  return entries


# PyTorch prefixes of the parts, in `UniRESTorch`; the JAX key each one lives under.
PART_PREFIXES = {"llm": ("llm", "llm."), "vision_tower": ("vision_low", "vision_tower."),
                 "vision_high": ("vision_high", "vision_high."), "sam_vit": ("sam_vit", "sam_vit."),
                 "mask_decoder": ("mask_decoder", "sam."), "heads": ("", "")}


def unires_parts(cfg: UniRESConfig) -> list[Part]:
  """The table of the whole model, as parts (LLM, ViT, ConvNeXt or SAM ViT, SAM decoder, UniRES heads); a part
  the config does not build (the ConvNeXt of LISA's variant) is absent."""
  tables = {"llm": (llama_table(cfg.llm), cfg.llm.num_layers if cfg.llm.scan_layers else 0),
            "vision_tower": (clip_vit_table(cfg.vit, prefix=""), cfg.vit.depth)}
  if cfg.uses_convnext:
    tables["vision_high"] = (convnext_hf_table(cfg.convnext), 0)
  if cfg.dense_source == "sam_vit":
    tables["sam_vit"] = (sam_vit_table(cfg.sam_vit, prefix=""), 0)
  tables["mask_decoder"] = (sam_decoder_table(cfg.mask_decoder), 0)
  tables["heads"] = (heads_table(cfg), 0)
  parts = []
  for name, (entries, num_layers) in tables.items():
    jax_prefix, torch_prefix = PART_PREFIXES[name]
    parts.append(Part(name, tuple(prefixed(entries, jax_prefix, torch_prefix)), num_layers))
  return parts


def param_shapes(cfg: UniRESConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{path: shape}` of the whole model's params (no memory allocated)."""
  from unires_jax.models.example_batch import example_batch
  from unires_jax.models.unires import UniRES

  batch = example_batch(cfg, 1)
  abstract = jax.eval_shape(lambda rng: UniRES(cfg).init(rng, batch), jax.random.key(0))
  return {path: tuple(leaf.shape) for path, leaf in mapping.flatten_params(nn.meta.unbox(abstract["params"])).items()}


def _flat_numpy(params: Mapping) -> dict[str, np.ndarray]:
  return {path: np.asarray(value) for path, value in mapping.flatten_params(nn.meta.unbox(dict(params))).items()}


def export_unires(params: Mapping[str, Any], cfg: UniRESConfig) -> dict[str, np.ndarray]:
  """UniRES params (boxed or not, without a `lora` key) → the `UniRESTorch` state dict as numpy arrays.

  Every parameter must be claimed by exactly one entry; a parameter no table knows is an error naming it.
  """
  flat = _flat_numpy(params)
  out: dict[str, np.ndarray] = {}
  claimed: set[str] = set()
  for part in unires_parts(cfg):
    out.update(mapping.export_params(part.entries, flat))
    claimed.update(e.jax_path for e in part.entries)
  unclaimed = sorted(set(flat) - claimed)
  if unclaimed:
    raise KeyError(f"UniRES export: parameter {unclaimed[0]!r} has no table entry ({len(unclaimed)} unclaimed)")
  return out


def import_unires(state_dict: Mapping[str, Any], cfg: UniRESConfig,
                  expected: Mapping[str, tuple[int, ...]] | None = None) -> dict:
  """`UniRESTorch` state dict (numpy or torch tensors) → UniRES params (nested numpy); strict, checked against
  the model's shapes (the first mismatching tensor is named)."""
  from unires_jax.convert.common import tensor_to_numpy

  expected = param_shapes(cfg) if expected is None else expected
  arrays = {name: tensor_to_numpy(value) for name, value in state_dict.items()}
  flat: dict[str, np.ndarray] = {}
  claimed: set[str] = set()
  for part in unires_parts(cfg):
    part_flat, report = mapping.import_params(
        part.entries, arrays, num_layers=part.num_layers,
        expected={e.jax_path: expected[e.jax_path] for e in part.entries if e.jax_path in expected},
        what=f"UniRES checkpoint ({part.name})", allow_unused=[".*"])  # unclaimed tensors are checked below
    flat.update(part_flat)
    claimed.update(report["mapped"])
  unused = sorted(set(arrays) - claimed)
  if unused:
    raise KeyError(f"UniRES checkpoint: {len(unused)} tensors are not mapped by the table, first {unused[0]!r}")
  absent = sorted(set(expected) - set(flat))
  if absent:
    raise KeyError(f"UniRES checkpoint: model parameter {absent[0]!r} has no tensor ({len(absent)} absent)")
  return mapping.unflatten_params(flat)
