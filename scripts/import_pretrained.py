"""Builds UniRES params from pretrained PyTorch parts; everything not supplied is initialised fresh.

    python scripts/import_pretrained.py --config configs/unires_7b.py --out /ckpt/init \
        --llm /hf/vicuna-7b --vision-tower /hf/clip-vit-large-patch14-336 \
        --convnext /hf/convnext_large_clip.safetensors --sam /hf/sam-vit-huge
    python scripts/import_pretrained.py --config configs/lisa.py:7b --out /ckpt/lisa7b \
        --lisa /hf/LISA-7B-v1 --vision-tower /hf/clip-vit-large-patch14

`--lisa` reads a whole LISA checkpoint (LLM, projector, SAM ViT-H, mask decoder, `[SEG]` head; `convert/lisa.py`)
through its index file, and copies its `tokenizer.model` and `added_tokens.json` to `OUT/tokenizer/`
(`data.tokenizer_path` of the written config points there).

Any `--config.<key>=<value>` overrides the config as in train.py. A part's transformers `config.json` (beside its
weights) is compared with the config first: a different architecture is refused, field by field with the override
that fits it, before any tensor is read (`unires_jax/convert/part_configs.py`).

Each part is read tensor by tensor (safetensors `safe_open`, or `.bin` via `torch.load(weights_only=True)`), mapped
through its table in `unires_jax/convert/`, checked against `jax.eval_shape` of the model (the first mismatching
tensor is named) and placed into its sharding. Writes `OUT/params` (Orbax), `OUT/config.json` and
`OUT/import_report.json` (every parameter: imported from which tensor, or initialised). Training starts from it
with `train.init_from=OUT` (see docs/conversion.md). The import itself is `unires_jax/convert/pretrained.py`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from unires_jax import cli  # noqa: E402
from unires_jax.convert import checkpoints, pretrained  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--out", required=True, help="output folder (params/, config.json, import_report.json)")
  parser.add_argument("--llm", help="LlamaForCausalLM folder or weight file")
  parser.add_argument("--vision-tower", help="CLIPVisionModel / CLIPModel folder or weight file")
  parser.add_argument("--convnext", help="ConvNeXt weights: timm, open_clip (visual.trunk.) or HF ConvNext keys")
  parser.add_argument("--sam", help="SamModel folder or weight file")
  parser.add_argument("--lisa", help="a LISA checkpoint folder (pytorch_model-*.bin + index, tokenizer, "
                                     "added_tokens.json); pair it with --vision-tower and configs/lisa.py")
  parser.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parameters")
  parser.epilog = "Any --config.<key>=<value> overrides the config, as in train.py (e.g. --config.model.llm.num_layers=2)."
  args, overrides = parser.parse_known_args(argv)
  config = cli.apply_config_overrides(checkpoints.config_from_file(args.config), overrides)
  sources = {"llm": args.llm, "vision_tower": args.vision_tower, "convnext": args.convnext, "sam": args.sam,
             "lisa": args.lisa}
  report = pretrained.import_pretrained(config, args.out, sources, args.seed)
  print(f"imported {report['num_imported_tensors']} tensors, initialised {report['num_initialised_tensors']}, "
        f"{report['num_params']:,} parameters in {report['seconds']:.1f}s → {args.out}")


if __name__ == "__main__":
  cli.run_main(main, "import_pretrained.py")
