"""Exports a UniRES checkpoint to PyTorch: transformers folders for the LLM and ViT, safetensors for the rest.

    python scripts/convert_to_pytorch.py --workdir /runs/toy --out /exports/toy
    python scripts/convert_to_pytorch.py --checkpoint /ckpt/lisa7b --out /exports/lisa7b --dtype bfloat16

OUT/llm/ loads with `LlamaForCausalLM.from_pretrained`, OUT/vision_tower/ with `CLIPVisionModel.from_pretrained`;
every other tensor goes to OUT/unires*.safetensors under the names of `unires_jax/convert/unires.py`. Each of the
three is sharded in the HF convention (`{prefix}-0000i-of-0000n.safetensors` + `{prefix}.safetensors.index.json`)
once it exceeds `--max-shard-size`, in `--dtype`. Tensors are converted and written one table entry at a time, so
beside the checkpoint's params the host holds at most one shard. OUT/config.json holds the run's model config, the
prompt settings `predict` needs and the export summary; OUT/tokenizer.model (with `added_tokens.json` when the run's
tokenizer has one) the run's tokenizer; OUT/README.md the model card. LoRA factors are merged into their kernels
unless `--keep-lora` (then the base weights stay unmerged and the factors go to OUT/lora.safetensors in PEFT's
layout, `<linear>.lora_A` [r, in] and `<linear>.lora_B` [out, r], with `scale = alpha / rank` in its metadata).
`UniRESTorch.from_exported(OUT)` runs it without JAX. The export itself is `unires_jax/convert/export.py`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from unires_jax import cli  # noqa: E402
from unires_jax.convert import checkpoints, export, shards  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training run folder (config.json, checkpoints/<step>/)")
  source.add_argument("--checkpoint", help="one checkpoints/<step>/ folder, or an import_pretrained.py output")
  parser.add_argument("--step", type=int, help="with --workdir: this step instead of the newest")
  parser.add_argument("--config", help="configs/X.py[:arg] when the checkpoint has no config.json beside it")
  parser.add_argument("--tokenizer", help="SentencePiece model to copy (default: the one the run's config uses)")
  parser.add_argument("--keep-lora", action="store_true", help="write LoRA factors separately instead of merging")
  parser.add_argument("--dtype", default="float32", choices=shards.DTYPES, help="dtype of the exported weights")
  parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 2GB, 500MB)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  path = args.workdir or args.checkpoint
  item_dir, run_dir = checkpoints.resolve_params_dir(path, args.step)
  params, config = checkpoints.load_params(path, args.step)
  if args.config:
    config = checkpoints.config_from_file(args.config)
  if config is None:
    raise FileNotFoundError("the checkpoint has no config.json beside it: pass --config configs/X.py")
  step_name = os.path.basename(os.path.dirname(item_dir))
  step = int(step_name) if step_name.isdigit() else None
  summary = export.convert_to_pytorch(params, config, args.out, args.keep_lora, args.tokenizer, args.dtype,
                                      shards.parse_size(args.max_shard_size), source=os.path.abspath(item_dir),
                                      step=step, workdir=run_dir)
  print(f"wrote {', '.join(summary['files'])} to {args.out} in {summary['seconds']:.1f}s")


if __name__ == "__main__":
  cli.run_main(main, "convert_to_pytorch.py")
