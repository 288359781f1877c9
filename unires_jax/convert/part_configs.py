"""A pretrained part's transformers `config.json` against our config section, before any tensor is read.

`scripts/import_pretrained.py` reads the `config.json` beside each part it is given (LLaMA, CLIP vision tower,
ConvNeXt, SAM mask decoder), translates it into our section's fields and refuses a mismatch with one line per
differing field, each with the `--config.model...` override that would make the config fit. A part without a
`config.json` (a lone timm or open_clip weight file) is checked tensor by tensor later, as before.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from unires_jax.errors import UserError

CONFIG_FILE = "config.json"
# Our section (`model.<section>`) of each part, and how a transformers config's fields read as its fields:
# {our field: (hf field, how to compare)}.
SECTIONS = {"llm": "llm", "vision_tower": "vit", "convnext": "convnext", "sam": "mask_decoder"}
CLIP_FIELDS = {"width": "hidden_size", "mlp_dim": "intermediate_size", "depth": "num_hidden_layers",
               "num_heads": "num_attention_heads", "image_size": "image_size", "patch_size": "patch_size",
               "layer_norm_eps": "layer_norm_eps"}
CONVNEXT_FIELDS = {"dims": "hidden_sizes", "depths": "depths", "layer_scale_init": "layer_scale_init_value"}
SAM_DECODER_FIELDS = {"transformer_dim": "hidden_size", "mlp_dim": "mlp_dim", "depth": "num_hidden_layers",
                      "num_heads": "num_attention_heads", "attention_downsample_rate": "attention_downsample_rate",
                      "num_multimask_outputs": "num_multimask_outputs", "iou_head_depth": "iou_head_depth",
                      "iou_head_hidden_dim": "iou_head_hidden_dim", "layer_norm_eps": "layer_norm_eps"}
LLAMA_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "rope_theta", "rms_norm_eps", "tie_embeddings")


class PartConfigMismatch(UserError, ValueError):
  """A pretrained part whose config.json describes another architecture than the config's model section."""


def config_path(path: str) -> str | None:
  """The `config.json` of a part given as a folder, or beside a weight file; None when there is none."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  candidate = os.path.join(folder, CONFIG_FILE)
  return candidate if os.path.isfile(candidate) else None


def read_hf_config(path: str) -> dict:
  """The config.json as transformers reads it (its defaults filled in when transformers is installed)."""
  with open(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as error:
      raise PartConfigMismatch(f"{path}: not valid JSON ({error})") from error
  try:
    import transformers
  except ImportError:
    return raw
  model_type = raw.get("model_type")
  if not model_type:
    return raw
  try:
    return transformers.AutoConfig.for_model(**raw).to_dict()
  except (ValueError, KeyError, TypeError):
    return raw


def _sub_config(hf: Mapping[str, Any], key: str) -> Mapping[str, Any]:
  """A composite config's part (CLIPConfig.vision_config, SamConfig.mask_decoder_config), or the config itself."""
  sub = hf.get(key)
  return sub if isinstance(sub, Mapping) else hf


def checkpoint_fields(part: str, hf: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of our section that a part's transformers config states."""
  if part == "llm":
    from unires_jax.convert.llama import hf_to_llama_config
    llama = hf_to_llama_config(hf)
    return {name: getattr(llama, name) for name in LLAMA_FIELDS}
  table, source = {"vision_tower": (CLIP_FIELDS, _sub_config(hf, "vision_config")),
                   "convnext": (CONVNEXT_FIELDS, hf),
                   "sam": (SAM_DECODER_FIELDS, _sub_config(hf, "mask_decoder_config"))}[part]
  return {ours: source[theirs] for ours, theirs in table.items() if theirs in source}


def _same(ours: Any, theirs: Any) -> bool:
  if isinstance(ours, (list, tuple)) or isinstance(theirs, (list, tuple)):
    return isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)) and len(ours) == len(theirs) and \
        all(_same(a, b) for a, b in zip(ours, theirs))
  if isinstance(ours, float) or isinstance(theirs, float):
    return abs(float(ours) - float(theirs)) <= 1e-9 * max(1.0, abs(float(theirs)))
  return ours == theirs


def _override_value(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def differences(part: str, section: Mapping[str, Any], hf: Mapping[str, Any]) -> list[str]:
  """One line per field of `model.<section>` that the checkpoint's config states otherwise."""
  name = SECTIONS[part]
  lines = []
  for field, theirs in checkpoint_fields(part, hf).items():
    if field not in section:
      continue
    ours = section[field]
    if not _same(ours, theirs):
      lines.append(f"model.{name}.{field} is {ours!r}, the checkpoint has {theirs!r} "
                   f"(--config.model.{name}.{field}={_override_value(theirs)})")
  return lines


def check_part_configs(model_config: Mapping[str, Any], sources: Mapping[str, str | None]) -> dict[str, str]:
  """Refuses (PartConfigMismatch) parts whose config.json differs from `model_config`; returns the config.json
  paths checked, by part."""
  checked, problems = {}, []
  for part, section_name in SECTIONS.items():
    path = sources.get(part)
    if not path:
      continue
    found = config_path(path)
    if found is None:
      continue
    section = model_config[section_name]
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    lines = differences(part, section, read_hf_config(found))
    checked[part] = found
    if lines:
      problems.append(f"--{part.replace('_', '-')} {path}: its {found} describes another model:\n  " +
                      "\n  ".join(lines))
  if problems:
    raise PartConfigMismatch("the config does not fit the pretrained parts (nothing was read):\n" +
                             "\n".join(problems))
  return checked
