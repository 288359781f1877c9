"""Exports a UniRES checkpoint to PyTorch: transformers folders for the LLM and ViT, safetensors for the rest.

    python scripts/convert_to_pytorch.py --workdir /runs/toy --out /exports/toy
    python scripts/convert_to_pytorch.py --checkpoint /runs/toy/checkpoints/2000 --out /exports/toy

OUT/llm/ loads with `LlamaForCausalLM.from_pretrained`, OUT/vision_tower/ with `CLIPVisionModel.from_pretrained`,
OUT/unires.safetensors holds every other tensor under the names of `unires_jax/convert/unires.py`, OUT/config.json
the run's model config, OUT/tokenizer.model the run's SentencePiece model. `UniRESTorch.from_exported(OUT)` runs
it without JAX. LoRA factors are merged into their kernels unless `--keep-lora` (then they go to lora.safetensors
and the exported base weights are the unmerged ones).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from unires_jax.convert import checkpoints, mapping  # noqa: E402
from unires_jax.convert.clip_vit import clip_vit_config_to_hf, export_clip_vit  # noqa: E402
from unires_jax.convert.llama import llama_config_to_hf  # noqa: E402
from unires_jax.convert.unires import export_unires  # noqa: E402
from unires_jax.models.unires import UniRESConfig  # noqa: E402
from unires_jax.train import lora as lora_lib  # noqa: E402

HEADS_FILE = "unires.safetensors"  # unires_jax.convert.torch_model.HEADS_FILE
SAFETENSORS_METADATA = {"format": "pt"}


def _save_hf_folder(directory: str, state_dict: dict, hf_config: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, os.path.join(directory, "model.safetensors"),
            metadata=SAFETENSORS_METADATA)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)


def _tokenizer_path(config: ml_collections.ConfigDict, override: str | None) -> str | None:
  if override:
    return override
  if "data" not in config:
    return None
  from unires_jax.data import pipeline
  return pipeline.resolve_tokenizer(config)


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


def convert_to_pytorch(params: dict, config: ml_collections.ConfigDict, out_dir: str, keep_lora: bool = False,
                       tokenizer: str | None = None) -> dict:
  """Writes the export of `params` to `out_dir`; returns a summary (files, tensor counts, seconds)."""
  start = time.perf_counter()
  cfg = UniRESConfig.from_config(config.model)
  had_lora = lora_lib.LORA_KEY in params
  params, lora = merge_or_split_lora(params, config, keep_lora)
  state_dict = export_unires(params, cfg)
  llm = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
  if cfg.llm.tie_embeddings:
    llm["lm_head.weight"] = llm["model.embed_tokens.weight"]
  heads = {k: v for k, v in state_dict.items() if not k.startswith(("llm.", "vision_tower."))}

  os.makedirs(out_dir, exist_ok=True)
  _save_hf_folder(os.path.join(out_dir, "llm"), llm,
                  dict(llama_config_to_hf(cfg.llm), model_type="llama", architectures=["LlamaForCausalLM"],
                       torch_dtype="float32"))
  _save_hf_folder(os.path.join(out_dir, "vision_tower"), export_clip_vit(params["vision_low"], cfg.vit),
                  dict(clip_vit_config_to_hf(cfg.vit), model_type="clip_vision_model",
                       architectures=["CLIPVisionModel"], torch_dtype="float32"))
  save_file({k: np.ascontiguousarray(v) for k, v in heads.items()}, os.path.join(out_dir, HEADS_FILE),
            metadata=SAFETENSORS_METADATA)
  files = ["llm/", "vision_tower/", HEADS_FILE, "config.json"]
  if lora is not None:
    flat = mapping.flatten_params(lora)
    save_file({k.replace("/", "."): np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()},
              os.path.join(out_dir, "lora.safetensors"), metadata=SAFETENSORS_METADATA)
    files.append("lora.safetensors")
  tokenizer = _tokenizer_path(config, tokenizer)
  if tokenizer:
    for target in (os.path.join(out_dir, "tokenizer.model"), os.path.join(out_dir, "llm", "tokenizer.model")):
      shutil.copyfile(tokenizer, target)
    files.append("tokenizer.model")
  summary = {"files": files, "num_llm_tensors": len(llm), "num_head_tensors": len(heads),
             "lora": ("kept" if keep_lora else "merged") if had_lora else "none",
             "tokenizer": tokenizer, "seconds": time.perf_counter() - start}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump({"model": config.model.to_dict(), "export": summary}, f, indent=2)
  return summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training run folder (config.json, checkpoints/<step>/)")
  source.add_argument("--checkpoint", help="one checkpoints/<step>/ folder, or an import_pretrained.py output")
  parser.add_argument("--step", type=int, help="with --workdir: this step instead of the newest")
  parser.add_argument("--config", help="configs/X.py[:arg] when the checkpoint has no config.json beside it")
  parser.add_argument("--tokenizer", help="SentencePiece model to copy (default: the one the run's config uses)")
  parser.add_argument("--keep-lora", action="store_true", help="write LoRA factors separately instead of merging")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  params, config = checkpoints.load_params(args.workdir or args.checkpoint, args.step)
  if args.config:
    config = checkpoints.config_from_file(args.config)
  if config is None:
    raise FileNotFoundError("the checkpoint has no config.json beside it: pass --config configs/X.py")
  summary = convert_to_pytorch(params, config, args.out, args.keep_lora, args.tokenizer)
  print(f"wrote {', '.join(summary['files'])} to {args.out} in {summary['seconds']:.1f}s")


if __name__ == "__main__":
  main()
