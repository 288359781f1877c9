"""UniRES params from pretrained PyTorch parts; everything not supplied is initialised fresh (what
`scripts/import_pretrained.py` writes).

The parts are `PARTS`: a LLaMA LLM, a CLIP vision tower, a ConvNeXt, SAM's mask decoder, or a whole LISA checkpoint
(LLM, projector, SAM ViT-H, mask decoder, `[SEG]` head; `convert/lisa.py`) read through its index file, whose
`tokenizer.model` and `added_tokens.json` are copied to `OUT/tokenizer/` (`data.tokenizer_path` of the written config
points there). A part's transformers `config.json` (beside its weights) is compared with the config first: a
different architecture is refused, field by field with the override that fits it, before any tensor is read
(`convert/part_configs.py`).

Each part is read tensor by tensor (safetensors `safe_open`, or `.bin` via `torch.load(weights_only=True)`), mapped
through its table in `unires_jax/convert/`, checked against `jax.eval_shape` of the model (the first mismatching
tensor is named) and placed into its sharding. Writes `OUT/params` (Orbax), `OUT/config.json` and
`OUT/import_report.json` (every parameter: imported from which tensor, or initialised).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Mapping

import flax.linen as nn
import jax
import ml_collections

from unires_jax import sharding
from unires_jax.convert import checkpoints, mapping, part_configs
from unires_jax.convert import lisa as lisa_convert
from unires_jax.convert.clip_vit import TOWER_ROOTS, clip_vision_prefix, clip_vit_table
from unires_jax.convert.convnext import convnext_hf_table, convnext_timm_table
from unires_jax.convert.llama import llama_table
from unires_jax.convert.sam import POSITIONAL, SKIPPED, TIED_POSITIONAL, sam_decoder_table
from unires_jax.convert.unires import prefixed
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.models.example_batch import example_batch
from unires_jax.models.unires import UniRES, UniRESConfig

PARTS = ("llm", "vision_tower", "convnext", "sam", "lisa")
# Buffers and heads that checkpoints carry beside the weights this model uses.
LLAMA_UNUSED = (r"model\.rotary_emb\.inv_freq", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class _Aliased(Mapping):
  """A reader that also answers `alias` with the tensor stored as `target` (SAM's tied positional matrix)."""

  def __init__(self, reader: Mapping, alias: str, target: str):
    self.reader, self.alias, self.target = reader, alias, target

  def __getitem__(self, name):
    return self.reader[self.target if name == self.alias else name]

  def __iter__(self):
    yield from self.reader
    if self.alias not in self.reader:
      yield self.alias

  def __len__(self):
    return len(self.reader) + (self.alias not in self.reader)

  def __contains__(self, name):
    return name in self.reader or (name == self.alias and self.target in self.reader)


def part_source(part: str, path: str, cfg: UniRESConfig) -> dict:
  """The table (JAX paths under the model's keys), reader, layer count and allowed leftovers of one part."""
  reader = checkpoints.TensorReader(path)
  if part == "llm":
    allowed = LLAMA_UNUSED + ((r"lm_head\.weight",) if cfg.llm.tie_embeddings else ())
    return dict(entries=prefixed(llama_table(cfg.llm), "llm", ""), reader=reader,
                num_layers=cfg.llm.num_layers if cfg.llm.scan_layers else 0, allow_unused=allowed)
  if part == "vision_tower":
    prefix = clip_vision_prefix(reader, f"vision_tower checkpoint {path}")
    if prefix:  # other towers and heads of a CLIPModel stay unread
      tower, others = re.escape(prefix), rf"(?!{re.escape(prefix)}).*"
    else:
      tower, others = "", rf"(?!{'|'.join(re.escape(r) for r in TOWER_ROOTS)}).*"
    return dict(entries=prefixed(clip_vit_table(cfg.vit, prefix=prefix), "vision_low", ""), reader=reader,
                num_layers=cfg.vit.depth, allow_unused=(others, rf"{tower}embeddings\.position_ids"))
  if part == "convnext":
    names = set(reader)
    if any(n.startswith("visual.trunk.") for n in names):  # an open_clip CLIP checkpoint
      table, allowed = convnext_timm_table(cfg.convnext, "visual.trunk."), (r"(?!visual\.trunk\.).*",
                                                                           r"visual\.trunk\.head\.fc\..*")
    elif "stem.0.weight" in names:  # timm
      table, allowed = convnext_timm_table(cfg.convnext), (r"head\.fc\..*",)
    elif "convnext.embeddings.patch_embeddings.weight" in names:  # ConvNextForImageClassification
      table, allowed = prefixed(convnext_hf_table(cfg.convnext), "", "convnext."), (r"classifier\..*",)
    else:  # ConvNextModel
      table, allowed = convnext_hf_table(cfg.convnext), ()
    return dict(entries=prefixed(table, "vision_high", ""), reader=reader, num_layers=0, allow_unused=allowed)
  if part == "sam":
    return dict(entries=prefixed(sam_decoder_table(cfg.mask_decoder), "mask_decoder", ""),
                reader=_Aliased(reader, POSITIONAL, TIED_POSITIONAL), num_layers=0, allow_unused=SKIPPED)
  if part == "lisa":
    return dict(entries=lisa_convert.lisa_table(cfg), reader=lisa_convert.IndexedReader(path),
                num_layers=cfg.llm.num_layers if cfg.llm.scan_layers else 0, allow_unused=lisa_convert.UNUSED)
  raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


def copy_lisa_tokenizer(lisa_dir: str, out_dir: str, llm_vocab_size: int) -> str:
  """Copies a LISA folder's `tokenizer.model` + `added_tokens.json` to `out_dir/tokenizer/`; returns the model path.

  The special-token ids come from `added_tokens.json` (never from tokenising their text) and must fit the LLM.
  """
  lisa_convert.lisa_special_ids(lisa_dir)
  source = os.path.join(lisa_dir, "tokenizer.model")
  if not os.path.exists(source):
    raise FileNotFoundError(f"LISA checkpoint {lisa_dir!r} has no tokenizer.model")
  target_dir = os.path.join(out_dir, "tokenizer")
  os.makedirs(target_dir, exist_ok=True)
  for name in ("tokenizer.model", tokenizer_lib.ADDED_TOKENS_FILE):
    shutil.copyfile(os.path.join(lisa_dir, name), os.path.join(target_dir, name))
  target = os.path.join(target_dir, "tokenizer.model")
  tokenizer_lib.check_vocab_fits(tokenizer_lib.Tokenizer(target), llm_vocab_size)
  return target


def import_pretrained(config: ml_collections.ConfigDict, out_dir: str, sources: Mapping[str, str | None],
                      seed: int = 0) -> dict:
  """Imports the given parts (`{part: path}`), initialises the rest, writes `out_dir`; returns the report."""
  start = time.perf_counter()
  part_configs.check_part_configs(config.model, sources)  # before any tensor is read
  overlap = [part for part in ("llm", "sam") if sources.get("lisa") and sources.get(part)]
  if overlap:
    raise ValueError(f"--lisa already holds the LLM and SAM; drop --{overlap[0]}")
  model = UniRES(UniRESConfig.from_config(config.model))
  cfg = model.config
  batch = example_batch(cfg, 1)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)

  def init(rng):
    return model.init(rng, batch)["params"]

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(seed))
    shardings = mapping.flatten_params(sharding.logical_to_shardings(boxed, mesh, rules))
  abstract = mapping.flatten_params(nn.meta.unbox(boxed))

  flat: dict[str, jax.Array] = {}
  mapped_rows: list[dict] = []
  for part in PARTS:
    path = sources.get(part)
    if not path:
      continue
    source = part_source(part, path, cfg)
    arrays, rows = checkpoints.stream_import(source["entries"], source["reader"], source["num_layers"], abstract,
                                             shardings, f"{part} checkpoint {path}", source["allow_unused"])
    flat.update(arrays)
    mapped_rows += rows

  fresh_paths = sorted(set(abstract) - set(flat))
  if fresh_paths:
    # Only the parameters not imported are computed: XLA drops the rest of the initialiser.
    def init_fresh(rng):
      everything = mapping.flatten_params(nn.meta.unbox(init(rng)))
      return {p: everything[p] for p in fresh_paths}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      flat.update(jax.jit(init_fresh, out_shardings={p: shardings[p] for p in fresh_paths})(jax.random.key(seed)))

  os.makedirs(out_dir, exist_ok=True)
  if sources.get("lisa") and "data" in config:
    config.data.tokenizer_path = copy_lisa_tokenizer(sources["lisa"], out_dir, cfg.llm.vocab_size)
  checkpoints.save_params(out_dir, mapping.unflatten_params(flat))
  with open(os.path.join(out_dir, checkpoints.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  report = {
      "sources": {k: v for k, v in sources.items() if v},
      "num_params": int(sum(a.size for a in abstract.values())),
      "num_imported_tensors": len(mapped_rows),
      "num_initialised_tensors": len(fresh_paths),
      "imported": mapped_rows,
      "initialised": [{"param": p, "shape": list(abstract[p].shape)} for p in fresh_paths],
      "seconds": time.perf_counter() - start,
  }
  with open(os.path.join(out_dir, "import_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report
