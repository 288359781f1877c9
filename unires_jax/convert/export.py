"""A UniRES checkpoint's params → a PyTorch export folder: transformers folders for the LLM and ViT, safetensors
for the rest (what `scripts/convert_to_pytorch.py` writes).

OUT/llm/ loads with `LlamaForCausalLM.from_pretrained`, OUT/vision_tower/ with `CLIPVisionModel.from_pretrained`;
every other tensor goes to OUT/unires*.safetensors under the names of `unires_jax/convert/unires.py`. Each of the
three is sharded in the HF convention (`{prefix}-0000i-of-0000n.safetensors` + `{prefix}.safetensors.index.json`)
once it exceeds `max_shard_bytes`, in `dtype`. Tensors are converted and written one table entry at a time, so
beside the checkpoint's params the host holds at most one shard. OUT/config.json holds the run's model config, the
prompt settings `predict` needs and the export summary; OUT/tokenizer.model (with `added_tokens.json` when the run's
tokenizer has one) the run's tokenizer; OUT/README.md the model card. LoRA factors are merged into their kernels
unless `keep_lora` (then the base weights stay unmerged and the factors go to OUT/lora.safetensors in PEFT's
layout, `<linear>.lora_A` [r, in] and `<linear>.lora_B` [out, r], with `scale = alpha / rank` in its metadata).
`UniRESTorch.from_exported(OUT)` (`convert/torch_model.py`) runs it without JAX; the folder's file names are
`convert/export_files.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from unires_jax.convert import mapping, model_card, shards
from unires_jax.convert.export_files import CONFIG_FILE, HEADS_PREFIX, LORA_FILE
from unires_jax.convert.hf_configs import clip_vit_config_to_hf, llama_config_to_hf
from unires_jax.convert.unires import unires_parts
from unires_jax.data import prompts
from unires_jax.models import lora as lora_lib
from unires_jax.models.unires import UniRESConfig

# Which writer each part's tensors go to, and the prefix stripped from their names there.
FOLDERS = {"llm": ("llm", "llm."), "vision_tower": ("vision_tower", "vision_tower.")}


def merge_or_split_lora(params: dict, config: ml_collections.ConfigDict,
                        keep_lora: bool) -> tuple[dict, dict | None]:
  """(model params without `lora`, the LoRA factors when kept); merged with the run's alpha/rank otherwise."""
  if lora_lib.LORA_KEY not in params:
    return params, None
  if keep_lora:
    return {k: v for k, v in params.items() if k != lora_lib.LORA_KEY}, params[lora_lib.LORA_KEY]
  lora_cfg = config.train.lora
  merged = lora_lib.merge_lora(params, float(lora_cfg.alpha), int(lora_cfg.rank))
  return jax.tree.map(np.asarray, merged), None


def _entry_tensors(entry: mapping.Entry, value: np.ndarray):
  """(torch name, array) of one table entry, layer by layer for a stacked entry."""
  if entry.stacked:
    for i in range(value.shape[0]):
      yield from zip((n.format(i=i) for n in entry.torch_names), mapping._as_tuple(entry.to_torch(value[i])))
  else:
    yield from zip(entry.torch_names, mapping._as_tuple(entry.to_torch(value)))


def lora_factors_to_torch(lora: dict, cfg: UniRESConfig, flat: dict) -> dict[str, np.ndarray]:
  """JAX LoRA factors {'path.kernel': {'a': [S, in, r], 'b': [S, r, out]}} → PEFT-layout factors under the
  PyTorch Linear names. Refused (naming the kernel) where the table's layout of a kernel is not `reshape(in, out).T`,
  so that the factors could not be applied to the exported weight."""
  entries = {e.jax_path: e for part in unires_parts(cfg) for e in part.entries}
  out = {}
  for key, factors in sorted(lora.items()):
    path = key.replace(".", "/")
    entry = entries.get(path)
    if entry is None or len(entry.torch_names) != 1 or not entry.torch_names[0].endswith(".weight"):
      raise KeyError(f"--keep-lora: kernel {path!r} has no single PyTorch Linear weight in the export table")
    a, b = np.asarray(factors["a"], np.float32), np.asarray(factors["b"], np.float32)  # [S, in, r], [S, r, out]
    layer_shape = flat[path].shape[1:] if entry.stacked else flat[path].shape
    probe = np.arange(a.shape[1] * b.shape[2], dtype=np.float32).reshape(a.shape[1], b.shape[2])  # [in, out]
    torch_probe = np.asarray(mapping._as_tuple(entry.to_torch(probe.reshape(layer_shape)))[0])
    if not np.array_equal(torch_probe, probe.T):
      raise ValueError(f"--keep-lora: the export layout of {path!r} is not a plain [in, out] transpose; merge the "
                       f"factors instead (drop --keep-lora)")
    module = entry.torch_names[0][:-len(".weight")]
    for layer in range(a.shape[0]):
      name = module.format(i=layer) if entry.stacked else module
      out[f"{name}.lora_A"] = np.ascontiguousarray(a[layer].T)  # [r, in]
      out[f"{name}.lora_B"] = np.ascontiguousarray(b[layer].T)  # [out, r]
  return out


def prompt_settings(config: ml_collections.ConfigDict) -> dict:
  """What `predict` needs to build prompts as the run's eval pipeline does (`data/prompts.py`)."""
  data = config.data
  return {"max_text_len": int(data.max_text_len), "instruction_template": str(data.instruction_templates[0]),
          "prompt_style": str(data.get("prompt_style", "unires")), "system_prompt": str(data.get("system_prompt", "")),
          "max_new_tokens": prompts.max_new_tokens(config)}


def _tokenizer_path(config: ml_collections.ConfigDict, override: str | None) -> str | None:
  if override:
    return override
  if "data" not in config or not (config.data.get("tokenizer_path") or config.data.get("sources")):
    return None  # e.g. an import that names no tokenizer
  from unires_jax.data import pipeline
  return pipeline.resolve_tokenizer(config)


def convert_to_pytorch(params: dict, config: ml_collections.ConfigDict, out_dir: str, keep_lora: bool = False,
                       tokenizer: str | None = None, dtype: str = "float32",
                       max_shard_bytes: int = shards.DEFAULT_MAX_SHARD_BYTES, source: str = "(in memory)",
                       step: int | None = None, workdir: str | None = None) -> dict:
  """Writes the export of `params` to `out_dir`; returns a summary (files, tensor counts, seconds)."""
  start = time.perf_counter()
  shards.numpy_dtype(dtype)  # refuses an unknown dtype before anything is written
  cfg = UniRESConfig.from_config(config.model)
  had_lora = lora_lib.LORA_KEY in params
  params, lora = merge_or_split_lora(params, config, keep_lora)
  flat = mapping.flatten_params(nn.meta.unbox(dict(params)))
  writers = {"llm": shards.ShardWriter(os.path.join(out_dir, "llm"), "model", dtype, max_shard_bytes),
             "vision_tower": shards.ShardWriter(os.path.join(out_dir, "vision_tower"), "model", dtype,
                                                max_shard_bytes),
             "heads": shards.ShardWriter(out_dir, HEADS_PREFIX, dtype, max_shard_bytes)}
  parts = unires_parts(cfg)
  claimed = {entry.jax_path for part in parts for entry in part.entries}
  missing = [path for path in sorted(claimed) if path not in flat]
  if missing:
    raise KeyError(f"export: parameter {missing[0]!r} is missing from the checkpoint's params")
  unclaimed = sorted(set(flat) - claimed)
  if unclaimed:
    raise KeyError(f"export: parameter {unclaimed[0]!r} has no table entry ({len(unclaimed)} unclaimed)")
  counts, files = {name: 0 for name in writers}, {}
  # One folder at a time, closed before the next starts: at most one partial shard is held in memory.
  for target, writer in writers.items():
    for part in parts:
      part_target, strip = FOLDERS.get(part.name, ("heads", ""))
      if part_target != target:
        continue
      for entry in part.entries:
        for name, tensor in _entry_tensors(entry, np.asarray(flat[entry.jax_path])):
          stripped = name[len(strip):] if target != "heads" else name
          if target == "vision_tower":
            stripped = "vision_model." + stripped  # CLIPVisionModel's on-disk names
          writer.add(stripped, tensor)
          counts[target] += 1
          if target == "llm" and cfg.llm.tie_embeddings and stripped == "model.embed_tokens.weight":
            writer.add("lm_head.weight", tensor)
            counts[target] += 1
    files[target] = writer.close()
  hf_configs = {"llm": dict(llama_config_to_hf(cfg.llm), model_type="llama", architectures=["LlamaForCausalLM"]),
                "vision_tower": dict(clip_vit_config_to_hf(cfg.vit), model_type="clip_vision_model",
                                     architectures=["CLIPVisionModel"])}
  for folder, hf_config in hf_configs.items():
    with open(os.path.join(out_dir, folder, "config.json"), "w") as f:
      json.dump(dict(hf_config, torch_dtype=dtype), f, indent=2)
  listing = ["llm/", "vision_tower/"] + files["heads"] + [CONFIG_FILE, model_card.CARD_FILE]
  if lora is not None:
    lora_cfg = config.train.lora
    save_file(lora_factors_to_torch(lora, cfg, flat), os.path.join(out_dir, LORA_FILE),
              metadata={"format": "pt", "scale": repr(float(lora_cfg.alpha) / int(lora_cfg.rank)),
                        "rank": str(int(lora_cfg.rank)), "alpha": repr(float(lora_cfg.alpha))})
    listing.append(LORA_FILE)
  tokenizer = _tokenizer_path(config, tokenizer)
  if tokenizer:
    added = os.path.join(os.path.dirname(os.path.abspath(tokenizer)), "added_tokens.json")
    for folder in (out_dir, os.path.join(out_dir, "llm")):
      shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.model"))
      if os.path.exists(added):
        shutil.copyfile(added, os.path.join(folder, "added_tokens.json"))
    listing.append("tokenizer.model")
  summary = {"files": listing, "num_llm_tensors": counts["llm"], "num_head_tensors": counts["heads"],
             "lora": ("kept" if keep_lora else "merged") if had_lora else "none", "dtype": dtype,
             "max_shard_bytes": int(max_shard_bytes), "source": source, "step": step,
             "tokenizer": tokenizer, "seconds": time.perf_counter() - start}
  exported = {"model": config.model.to_dict(), "export": summary}
  if "data" in config:
    exported["prompt"] = prompt_settings(config)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(exported, f, indent=2)
  with open(os.path.join(out_dir, model_card.CARD_FILE), "w") as f:
    f.write(model_card.model_card(config.to_dict(), source, step, workdir, summary))
  return summary
