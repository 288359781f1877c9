"""A LISA checkpoint (dvlab-research/LISA; `/work/shared/FORMATS.md` "LISA checkpoints") → `configs/lisa.py` params.

One table covers everything the checkpoint holds; the CLIP tower is not in it (LISA reloads
`openai/clip-vit-large-patch14`) and comes from `--vision-tower` through `convert/clip_vit.py`:

| LISA tensors | JAX params | notes |
|---|---|---|
| `model.embed_tokens`, `model.layers.{i}.*`, `model.norm`, `lm_head` | `llm/...` | `convert/llama.py` |
| `model.mm_projector.{weight,bias}` | `vision_flow/image_projector/fc` | one Linear |
| `model.visual_model.image_encoder.*` | `sam_vit/...` | segment-anything `ImageEncoderViT` names |
| `model.visual_model.mask_decoder.*`, `prompt_encoder.{pe_layer,no_mask_embed}` | `mask_decoder/...` | segment-anything `MaskDecoder` names |
| `model.text_hidden_fcs.0.{0,2}` | `seg_head/fc{1,2}` | Linear, ReLU, Linear |

Known and unused: the prompt encoder's point, box and mask embeddings (`point_embeddings.*`, `not_a_point_embed`,
`mask_downscaling.*`): LISA's only sparse prompt is the `[SEG]` embedding and its dense prompt `no_mask_embed`.
The shards are read through their index file (`pytorch_model.bin.index.json`) with `torch.load(weights_only=True)`
only, so nothing else in the folder (e.g. `training_args.bin`) is unpickled.
"""

from __future__ import annotations

import json
import os

import numpy as np

from unires_jax.convert import checkpoints, mapping, sam_vit
from unires_jax.convert.llama import llama_table
from unires_jax.convert.sam import two_way_transformer_table, upscaling_table
from unires_jax.convert.unires import prefixed
from unires_jax.models.mask_decoder import MaskDecoderConfig
from unires_jax.models.sam_vit import SamVitConfig
from unires_jax.models.unires import UniRESConfig

INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
SAM = "model.visual_model."
# LISA tensors this model knows but does not use (see the module docstring), and buffers of the LLaMA layers.
UNUSED = (r"model\.visual_model\.prompt_encoder\.point_embeddings\.\d+\.weight",
          r"model\.visual_model\.prompt_encoder\.not_a_point_embed\.weight",
          r"model\.visual_model\.prompt_encoder\.mask_downscaling\..*",
          r"model\.rotary_emb\.inv_freq", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def sam_vit_table(cfg: SamVitConfig, prefix: str = SAM + "image_encoder.") -> list[mapping.Entry]:
  """`SamVisionEncoder` params ↔ segment-anything `ImageEncoderViT` names (`blocks.{i}`, `neck.{0..3}`)."""
  return sam_vit.sam_vit_table(cfg, prefix, sam_vit.SEGMENT_ANYTHING_NAMES)


def _mlp(jax_prefix: str, torch_prefix: str, num_layers: int) -> list[mapping.Entry]:
  """SAM's MLP head: JAX `proj_in`, `layers_{j}`, `proj_out` ↔ segment-anything `layers.{0..n-1}`."""
  jax_names = ["proj_in"] + [f"layers_{j}" for j in range(num_layers - 2)] + ["proj_out"]
  return [e for k, name in enumerate(jax_names) for e in mapping.linear(f"{jax_prefix}/{name}",
                                                                         f"{torch_prefix}.layers.{k}")]


def sam_decoder_table(cfg: MaskDecoderConfig, prefix: str = SAM) -> list[mapping.Entry]:
  """`MaskDecoder` params ↔ segment-anything `Sam` names (`mask_decoder.*`, the dense `prompt_encoder.*`)."""
  md = prefix + "mask_decoder"
  table = [
      mapping.Entry.make("prompt_encoder/shared_embedding/positional_embedding",
                         prefix + "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
      mapping.Entry.make("prompt_encoder/no_mask_embed/embedding", prefix + "prompt_encoder.no_mask_embed.weight"),
      mapping.Entry.make("iou_token/embedding", f"{md}.iou_token.weight"),
      mapping.Entry.make("mask_tokens/embedding", f"{md}.mask_tokens.weight"),
  ]
  table += two_way_transformer_table(cfg.depth, f"{md}.transformer", norm="norm")
  # segment-anything's `output_upscaling` Sequential: 0 and 3 the transposed convs, 1 the LayerNorm2d.
  table += upscaling_table(md, ("output_upscaling.0", "output_upscaling.3"), "output_upscaling.1")
  for i in range(cfg.num_mask_tokens):
    table += _mlp(f"output_hypernetworks_mlps_{i}", f"{md}.output_hypernetworks_mlps.{i}", 3)
  table += _mlp("iou_prediction_head", f"{md}.iou_prediction_head", cfg.iou_head_depth)
  return table


def check_lisa_config(cfg: UniRESConfig) -> None:
  """A LISA checkpoint fills the LISA variant only; anything else is refused naming the key."""
  wrong = []
  if cfg.dense_source != "sam_vit":
    wrong.append(f"model.dense_source is {cfg.dense_source!r}, LISA's dense source is 'sam_vit'")
  if cfg.vision_flow.projector != "linear":
    wrong.append(f"model.vision_flow.projector is {cfg.vision_flow.projector!r}, LISA's mm_projector is 'linear'")
  if wrong:
    raise ValueError("LISA checkpoint: the config is not LISA's (configs/lisa.py): " + "; ".join(wrong))


def lisa_table(cfg: UniRESConfig) -> list[mapping.Entry]:
  """Every parameter a LISA checkpoint fills, with JAX paths from the model root."""
  check_lisa_config(cfg)
  table = prefixed(llama_table(cfg.llm), "llm", "")
  table += prefixed(mapping.linear("image_projector/fc", "model.mm_projector"), "vision_flow", "")
  table += prefixed(sam_vit_table(cfg.sam_vit), "sam_vit", "")
  table += prefixed(sam_decoder_table(cfg.mask_decoder), "mask_decoder", "")
  table += prefixed(mapping.linear("fc1", "model.text_hidden_fcs.0.0") + mapping.linear("fc2", "model.text_hidden_fcs.0.2"),
                    "seg_head", "")
  return table


class IndexedReader(checkpoints.NamedTensors):
  """Name → numpy array over the shards an HF index file lists, read lazily one tensor at a time.

  Every shard the index names must exist and hold the tensors the index assigns to it; a shard is opened only
  through `checkpoints.TensorReader` (safetensors `safe_open`, or `torch.load(weights_only=True, mmap=True)`).
  Without an index file the folder's single `pytorch_model.bin` / `model.safetensors` is read.
  """

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"LISA checkpoint {directory!r} is not a folder")
    index = next((os.path.join(directory, n) for n in INDEX_FILES if os.path.exists(os.path.join(directory, n))),
                 None)
    if index is None:
      single = [os.path.join(directory, n) for n in ("model.safetensors", "pytorch_model.bin")
                if os.path.exists(os.path.join(directory, n))]
      if not single:
        raise FileNotFoundError(f"LISA checkpoint {directory!r}: no {' or '.join(INDEX_FILES)}, and no single "
                                f"pytorch_model.bin / model.safetensors")
      weight_map = None
      files = single[:1]
    else:
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise ValueError(f"{index!r}: expected JSON with a 'weight_map' {{tensor: shard file}} ({e})") from e
      files = sorted({os.path.join(directory, shard) for shard in weight_map.values()})
      missing = [f for f in files if not os.path.exists(f)]
      if missing:
        raise FileNotFoundError(f"{index!r} lists shard {os.path.basename(missing[0])!r}, which is not in "
                                f"{directory!r}")
    self.index = index
    self._readers = {file: checkpoints.TensorReader(file) for file in files}
    self._where = {name: file for file, reader in self._readers.items() for name in reader}
    if weight_map is not None:
      for name, shard in weight_map.items():
        file = os.path.join(directory, shard)
        if self._where.get(name) != file:
          raise KeyError(f"{index!r}: tensor {name!r} is listed in {shard!r} but that shard does not hold it")

  def __getitem__(self, name: str) -> np.ndarray:
    return self._readers[self._where[name]][name]


def lisa_special_ids(directory: str) -> dict[str, int]:
  """The special-token ids of a LISA folder's `added_tokens.json` (`[SEG]` required), by our token names."""
  from unires_jax.data import tokenizer as tokenizer_lib

  path = os.path.join(directory, tokenizer_lib.ADDED_TOKENS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"LISA checkpoint {directory!r} has no {tokenizer_lib.ADDED_TOKENS_FILE} (the "
                            f"special-token ids, [SEG] among them)")
  ids = tokenizer_lib.read_added_tokens(path)
  if tokenizer_lib.SEG_TOKEN not in ids:
    raise KeyError(f"{path!r} defines no {tokenizer_lib.SEG_TOKEN!r} token")
  return ids
