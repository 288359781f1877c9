"""Inference: greedy generation with the KV cache; every generated `[SEG]` becomes a mask.

The eval batch holds the prompt followed by a reference answer; generation only sees the prompt (tokens up to
the position that predicts the first answer token) and writes its own answer. A row whose answer holds no
`[SEG]` is predicted no-target (empty mask). The mask prompt is the hidden state that *predicted* `[SEG]`, as in
training (docs/DESIGN.md). Batched: rows of different prompt lengths prefill together (right padding, masked)
and then step one token at a time.

Also here: the prompt batch of raw images and phrases (`make_prompt_batch`, built as the input pipeline builds its
prompts, for `scripts/predict.py`) and parameters placed in their shardings (`place_params`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unires_jax import sharding
from unires_jax.data import pipeline, prompts
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.data import transforms
from unires_jax.models.llm import Llama, init_cache, with_decode_layers
from unires_jax.models import example_batch as example_batch_lib
from unires_jax.models.unires import DTYPES, UniRES

log = logging.getLogger(__name__)


def prompt_end_index(loss_mask: jax.Array) -> jax.Array:
  """[B, L] → [B]: the last prompt position (the one predicting the first answer token)."""
  return jnp.argmax(loss_mask > 0, axis=1).astype(jnp.int32)


def _prefill(module: UniRES, batch, prompt_mask):
  vision = module.encode_vision(batch)
  embeds, mask = module.embed_sequence(batch["input_ids"], batch["token_type"], prompt_mask, vision,
                                       batch["object_box_mask"], batch["part_box_mask"])
  hidden = module.run_llm(embeds, mask, decode=True)  # [B, L, D]
  return hidden, mask, vision["dense"]


def _step(module: UniRES, token_ids, token_mask):
  embeds = module.llm.embed(token_ids)  # [B, 1, D]
  hidden = module.run_llm(embeds, token_mask, decode=True)  # [B, 1, D]
  return hidden, module.lm_logits(hidden)


def _masks(module: UniRES, seg_hidden, sequence_hidden, token_type, mask, dense):
  return module.decode_masks(seg_hidden, sequence_hidden, token_type, mask, dense)


def make_generate_fn(model: UniRES, seg_id: int, eos_id: int, pad_id: int, max_new_tokens: int = 16,
                     params_transform: Callable = lambda p: p) -> Callable:
  """generate(params, batch) → {'mask_logits' [B, S, S], 'has_seg' [B], 'tokens' [B, T], 'iou_pred' [B]}."""
  cfg = model.config
  llm = Llama(cfg.llm, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")

  def generate(params, batch):
    params = params_transform(params)
    params = {**params, "llm": with_decode_layers(params["llm"], cfg.llm)}  # per-layer weights, sliced once
    batch_size, seq_len = batch["input_ids"].shape
    if seq_len + max_new_tokens > cfg.llm.max_seq_len:
      raise ValueError(f"prompt length {seq_len} + max_new_tokens {max_new_tokens} exceeds the KV cache "
                       f"(model.llm.max_seq_len={cfg.llm.max_seq_len})")
    end = prompt_end_index(batch["loss_mask"])  # [B]
    prompt_mask = batch["attention_mask"] & (jnp.arange(seq_len)[None, :] <= end[:, None])  # [B, L]
    cache = {"llm": init_cache(llm, batch_size)}
    (hidden, mask, dense), variables = model.apply({"params": params, "cache": cache}, batch, prompt_mask,
                                                   method=_prefill, mutable=["cache"])
    last_hidden = jnp.take_along_axis(hidden, end[:, None, None], axis=1)[:, 0]  # [B, D]
    first_logits = model.apply({"params": params}, last_hidden[:, None], method=lambda m, h: m.lm_logits(h))
    token = jnp.argmax(first_logits[:, 0], axis=-1).astype(jnp.int32)  # [B]

    def body(carry, _):
      cache, token, predicting_hidden, done, seg_hidden, has_seg = carry
      active = ~done  # [B]
      is_seg = (token == seg_id) & active & ~has_seg
      seg_hidden = jnp.where(is_seg[:, None], predicting_hidden, seg_hidden)
      has_seg = has_seg | is_seg
      emitted = jnp.where(active, token, pad_id)
      done = done | (active & (token == eos_id))
      (step_hidden, logits), new_vars = model.apply(
          {"params": params, "cache": cache}, emitted[:, None], active[:, None], method=_step, mutable=["cache"])
      next_token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
      return (new_vars["cache"], next_token, step_hidden[:, 0], done, seg_hidden, has_seg), emitted

    init = (variables["cache"], token, last_hidden, jnp.zeros((batch_size,), bool), jnp.zeros_like(last_hidden),
            jnp.zeros((batch_size,), bool))
    (_, _, _, _, seg_hidden, has_seg), tokens = jax.lax.scan(body, init, None, length=max_new_tokens)
    mask_logits, iou_pred = model.apply({"params": params}, seg_hidden, hidden, batch["token_type"], mask, dense,
                                        method=_masks)
    return {"mask_logits": mask_logits, "has_seg": has_seg, "tokens": tokens.T, "iou_pred": iou_pred}

  return generate


def teacher_forced_masks(model: UniRES, params_transform: Callable = lambda p: p) -> Callable:
  """predict(params, batch) with the reference answer fed in (no generation): an upper bound used in tests."""
  def predict(params, batch):
    out = model.apply({"params": params_transform(params)}, batch)
    return {"mask_logits": out["mask_logits"], "has_seg": batch["has_target"]}
  return predict


def decode_answers(tokens: np.ndarray, tokenizer: Any) -> list[str]:
  """Generated ids [B, T] → text, cut at the first end-of-sequence."""
  texts = []
  for row in np.asarray(tokens):
    ids = []
    for token in row.tolist():
      if token == tokenizer.eos_id:
        break
      ids.append(token)
    texts.append(tokenizer.decode(ids))
  return texts


# ------------------------------------------------------------------------------------ prompts of raw images


def make_prompt_batch(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                      images: Sequence[np.ndarray], phrases: Sequence[str],
                      boxes: Sequence[Mapping[str, Any] | None] | None = None,
                      where: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """A batch (docs/DESIGN.md keys) holding only prompts, for generation on raw images (`prompts.prompt_batch`).

  images: uint8 [h, w, 3] each; phrases: the referring expressions; boxes: per image None or
  {'object': [[x0, y0, x1, y1], ...], 'part': [...]} in original pixels (missing kinds = no proposals, all box
  masks False). The instruction is `data.instruction_templates[0]`, as the eval pipeline picks it, and the prompt
  comes from `pipeline.prompt_ids`, so train, eval and inference see the same tokens. `loss_mask` is 1 at the last
  prompt position only (the one that predicts the first answer token). Phrases and boxes are checked
  (`data.inputs`: no blank phrase, none over the text budget, finite ordered boxes); `where` names each request
  in those errors.
  """
  data = pipeline.DataConfig(**config.data.to_dict())
  return prompts.prompt_batch(pipeline.Layout.from_config(config), tokenizer, data.instruction_templates[0], images,
                              phrases, boxes, where)


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Repeats row 0 up to `size` rows, the extra rows marked `sample_index = -1` (as eval padding)."""
  rows = len(batch["sample_index"])
  if rows > size:
    raise ValueError(f"pad_batch: {rows} rows do not fit a batch of {size}")
  padded = {key: np.concatenate([value, np.repeat(value[:1], size - rows, axis=0)]) for key, value in batch.items()}
  padded["sample_index"][rows:] = -1
  return padded


def masks_to_original(outputs: Mapping[str, np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
  """Generation outputs → one bool mask [h, w] per row of `sizes` (empty where no `[SEG]` was generated)."""
  masks = []
  for row, (height, width) in enumerate(sizes):
    if bool(outputs["has_seg"][row]):
      masks.append(transforms.mask_logits_to_original(np.asarray(outputs["mask_logits"][row]), height, width))
    else:
      masks.append(np.zeros((height, width), bool))
  return masks


BOX_COLOURS = {"object": (255, 200, 0), "part": (0, 200, 255)}  # outlines of object / part proposals


def overlay(pixels: np.ndarray, mask: np.ndarray, colour=(255, 0, 0), alpha: float = 0.5,
            boxes: Mapping[str, Any] | None = None) -> np.ndarray:
  """uint8 [h, w, 3]: the image with the mask tinted in `colour` and, given `boxes` ({'object': [[x0, y0, x1, y1],
  ...], 'part': [...]} in pixels), the proposals outlined (objects yellow, parts cyan, 1 px)."""
  out = np.asarray(pixels, np.float32).copy()
  out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
  out = out.round().astype(np.uint8)
  if boxes:
    from PIL import Image, ImageDraw

    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    for kind, kind_colour in BOX_COLOURS.items():
      for x0, y0, x1, y1 in np.asarray(boxes.get(kind, []), np.float32).reshape(-1, 4):
        draw.rectangle([float(x0), float(y0), max(float(x0), float(x1) - 1), max(float(y0), float(y1) - 1)],
                       outline=kind_colour)
    out = np.asarray(image)
  return out


# --------------------------------------------------------------------------------- a checkpoint on a mesh


def place_params(model: UniRES, model_cfg: ml_collections.ConfigDict, params: Any, mesh, rules) -> Any:
  """Host params → arrays in the shardings their logical axis names give under `mesh` and `rules`."""

  example = {k: np.zeros(v.shape, v.dtype) for k, v in example_batch_lib.abstract_batch(model_cfg, 1).items()}
  abstract = jax.eval_shape(lambda rng: model.init(rng, example)["params"], jax.random.key(0))  # boxed
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  expected = jax.tree_util.tree_structure(shardings)
  if jax.tree_util.tree_structure(params) != expected:
    missing = set(jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p),
                                                                             shardings)))
    found = set(jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p),
                                                                           params)))
    raise ValueError(f"checkpoint params do not match the model of its config: missing {sorted(missing - found)[:5]}, "
                     f"unexpected {sorted(found - missing)[:5]}")
  return jax.tree.map(lambda value, target: jax.device_put(np.asarray(value), target), params, shardings)
