"""Prompts and boxes of a batch, without JAX: what the pipeline, JAX inference and the PyTorch export share.

The token layout of a prompt (`Layout`, from the config's model and data sections; `prompt_ids` in the configured
`data.prompt_style`), the box choice (`select_boxes`: all when they fit, else targets first, then larger first) and
the canvas boxes (`canvas_boxes`), and `prompt_batch`: the batch of raw images and phrases that generation starts
from. `unires_jax/data/pipeline.py` re-exports the names it always had; `eval/inference.py::make_prompt_batch` and
`convert/torch_predict.py` build their batches here, so the three see the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from unires_jax.data import inputs
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.data import transforms

DEFAULT_MAX_NEW_TOKENS = 16

# token_type values (DESIGN.md batch table).
TEXT, IMAGE_SLOT, OBJECT_SLOT, PART_SLOT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static shapes a batch has, from the model section of the config."""
  image_size_low: int
  image_size_high: int
  num_image_slots: int
  max_object_boxes: int
  max_part_boxes: int
  max_text_len: int
  prompt_style: str = "unires"  # a key of PROMPT_STYLES
  system_prompt: str = ""

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Layout:
    vit, flow = config.model.vit, config.model.vision_flow
    if vit.image_size % vit.patch_size:
      raise ValueError(f"model.vit.image_size {vit.image_size} is not a multiple of patch_size {vit.patch_size}")
    layout = cls(image_size_low=int(vit.image_size), image_size_high=int(config.model.convnext.image_size),
                 num_image_slots=(vit.image_size // vit.patch_size) ** 2,
                 max_object_boxes=int(flow.max_object_boxes), max_part_boxes=int(flow.max_part_boxes),
                 max_text_len=int(config.data.max_text_len),
                 prompt_style=str(config.data.get("prompt_style", "unires")),
                 system_prompt=str(config.data.get("system_prompt", "")))
    if layout.prompt_style not in PROMPT_STYLES:
      raise ValueError(f"data.prompt_style {layout.prompt_style!r}: expected one of {sorted(PROMPT_STYLES)}")
    if layout.max_text_len > config.model.llm.max_seq_len:
      raise ValueError(f"data.max_text_len {layout.max_text_len} exceeds model.llm.max_seq_len "
                       f"{config.model.llm.max_seq_len}")
    if layout.max_text_len <= layout.prefix_len:
      raise ValueError(f"data.max_text_len {layout.max_text_len} leaves no room for text after the "
                       f"{layout.prefix_len} visual prefix tokens")
    return layout

  @property
  def prefix_len(self) -> int:
    """`<s>` plus the marked groups of visual slots (llava_v1: the image group only; its system text not counted)."""
    if self.prompt_style == "llava_v1":
      return 1 + self.num_image_slots + 2
    return 1 + (self.num_image_slots + 2) + (self.max_object_boxes + 2) + (self.max_part_boxes + 2)


# ---------------------------------------------------------------------------------------- the prompt


def max_new_tokens(config: ml_collections.ConfigDict) -> int:
  """How many tokens generation may add after the prompt: the run's `generation.max_new_tokens` (run configs saved
  before that section existed: `eval.max_new_tokens`), else 16."""
  for section in ("generation", "eval"):
    value = (config.get(section, None) or {}).get("max_new_tokens", None)
    if value is not None:
      return int(value)
  return DEFAULT_MAX_NEW_TOKENS


def visual_prefix(tokenizer: tokenizer_lib.Tokenizer, layout: Layout) -> tuple[list[int], list[int]]:
  """`<s> <im_start> <image>×Ni <im_end> <obj_start> <obj>×No <obj_end> <part_start> <part>×Np <part_end>`.

  Returns (ids, token_type); the slot tokens carry types 1/2/3, the markers and `<s>` are text (0).
  """
  special = tokenizer.special_ids
  ids, types = [tokenizer.bos_id], [TEXT]
  groups = ((tokenizer_lib.IMAGE_START, tokenizer_lib.IMAGE_TOKEN, tokenizer_lib.IMAGE_END, layout.num_image_slots,
             IMAGE_SLOT),
            (tokenizer_lib.OBJECT_START, tokenizer_lib.OBJECT_TOKEN, tokenizer_lib.OBJECT_END,
             layout.max_object_boxes, OBJECT_SLOT),
            (tokenizer_lib.PART_START, tokenizer_lib.PART_TOKEN, tokenizer_lib.PART_END, layout.max_part_boxes,
             PART_SLOT))
  for start, slot, end, count, slot_type in groups:
    ids += [special[start]] + [special[slot]] * count + [special[end]]
    types += [TEXT] + [slot_type] * count + [TEXT]
  return ids, types


def unires_prompt(tokenizer: tokenizer_lib.Tokenizer, layout: Layout,
                  instruction: str) -> tuple[list[int], list[int]]:
  """UniRES++: the visual prefix, then `USER: {instruction} ASSISTANT:`."""
  ids, types = visual_prefix(tokenizer, layout)
  question = tokenizer.encode(f"USER: {instruction} ASSISTANT:")
  return ids + question, types + [TEXT] * len(question)


def llava_v1_prompt(tokenizer: tokenizer_lib.Tokenizer, layout: Layout,
                    instruction: str) -> tuple[list[int], list[int]]:
  """LISA / LLaVA-1: `<s>{system} USER: <im_start><image>×Ni<im_end>\n{instruction} ASSISTANT:`.

  Only image slots exist (a layout with object or part slots is refused); the system text is `data.system_prompt`.
  """
  if layout.max_object_boxes or layout.max_part_boxes:
    raise ValueError(f"data.prompt_style 'llava_v1' has no object/part slots, but the model has "
                     f"{layout.max_object_boxes} object and {layout.max_part_boxes} part boxes "
                     f"(model.vision_flow.max_object_boxes / max_part_boxes must be 0)")
  special = tokenizer.special_ids
  head = tokenizer.encode(f"{layout.system_prompt} USER:" if layout.system_prompt else "USER:")
  image = ([special[tokenizer_lib.IMAGE_START]] + [special[tokenizer_lib.IMAGE_TOKEN]] * layout.num_image_slots
           + [special[tokenizer_lib.IMAGE_END]])
  question = tokenizer.encode(f"\n{instruction} ASSISTANT:")
  ids = [tokenizer.bos_id] + head + image + question
  types = [TEXT] * (1 + len(head)) + [TEXT] + [IMAGE_SLOT] * layout.num_image_slots + [TEXT] + [TEXT] * len(question)
  return ids, types


# data.prompt_style → the prompt builder (ids, token_type) up to and including `ASSISTANT:`.
PROMPT_STYLES = {"unires": unires_prompt, "llava_v1": llava_v1_prompt}


def prompt_ids(tokenizer: tokenizer_lib.Tokenizer, layout: Layout, instruction: str) -> tuple[list[int], list[int]]:
  """The whole prompt up to and including `ASSISTANT:`: (ids, token_type). Inference generates from here."""
  return PROMPT_STYLES[layout.prompt_style](tokenizer, layout, instruction)


# --------------------------------------------------------------------------------------------- boxes


def box_area(boxes: np.ndarray) -> np.ndarray:
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
  """IoU [Na, Nb] of (x0, y0, x1, y1) boxes."""
  a = np.asarray(boxes_a, np.float32).reshape(-1, 1, 4)
  b = np.asarray(boxes_b, np.float32).reshape(1, -1, 4)
  width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  intersection = width * height
  union = box_area(a.reshape(-1, 4))[:, None] + box_area(b.reshape(-1, 4))[None, :] - intersection
  return np.where(union > 0, intersection / np.maximum(union, 1e-9), 0.0)


def select_boxes(boxes: np.ndarray, is_target: np.ndarray, max_boxes: int) -> tuple[np.ndarray, int]:
  """Keeps at most `max_boxes`: all boxes when they fit (in order); else targets first, then larger area first.

  Ties keep the original order (stable sort). Returns (kept [K, 4], number dropped).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if len(boxes) <= max_boxes:
    return boxes, 0
  order = np.lexsort((-box_area(boxes), ~np.asarray(is_target, bool)))  # last key is primary
  return boxes[order[:max_boxes]], len(boxes) - max_boxes


def granularity_boxes(record: dict, ref: dict, granularity: str, box_source: str) -> tuple[np.ndarray, np.ndarray]:
  """Boxes of one granularity in original pixels [N, 4], and which of them stand for the referred targets [N]."""
  if box_source == "none":
    return np.zeros((0, 4), np.float32), np.zeros((0,), bool)
  annotations = [a for a in record["annotations"] if a["granularity"] == granularity]
  referred = {int(a) for a in ref["ann_ids"]}
  gt_boxes = np.asarray([a["bbox"] for a in annotations], np.float32).reshape(-1, 4)
  gt_is_target = np.asarray([int(a["ann_id"]) in referred for a in annotations], bool)
  if box_source == "annotations":
    return gt_boxes, gt_is_target
  proposals = np.asarray(record["proposals"][granularity], np.float32).reshape(-1, 4)
  if not gt_is_target.any() or not len(proposals):
    return proposals, np.zeros((len(proposals),), bool)
  # A proposal stands for a referred target when it overlaps one of the target boxes with IoU >= 0.5.
  return proposals, box_iou(proposals, gt_boxes[gt_is_target]).max(axis=1) >= 0.5


def canvas_boxes(boxes: np.ndarray, height: int, width: int, size: int, max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
  """Original-pixel boxes [K, 4] → padded canvas boxes [max, 4] and their mask [max]."""
  clipped = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
  padded = np.zeros((max_boxes, 4), np.float32)
  padded[:len(boxes)] = transforms.transform_boxes(clipped, height, width, size)
  mask = np.zeros((max_boxes,), bool)
  mask[:len(boxes)] = True
  return padded, mask


def kept_boxes(boxes: np.ndarray | None, max_boxes: int) -> np.ndarray:
  """The boxes [K <= max_boxes, 4] the model reads of `boxes` (or None) on a raw image: all when they fit, else the
  larger first (`select_boxes` with no known targets)."""
  boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
  kept, _ = select_boxes(boxes, np.zeros((len(boxes),), bool), max_boxes)
  return kept


def _padded_canvas_boxes(boxes: np.ndarray | None, height: int, width: int, size: int,
                         max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
  """Original-pixel boxes [K, 4] (or None) → canvas boxes [max_boxes, 4] and their mask [max_boxes] (`kept_boxes`)."""
  return canvas_boxes(kept_boxes(boxes, max_boxes), height, width, size, max_boxes)


def prompt_batch(layout: Layout, tokenizer: tokenizer_lib.Tokenizer, instruction_template: str,
                 images: Sequence[np.ndarray], phrases: Sequence[str],
                 boxes: Sequence[Mapping[str, Any] | None] | None = None,
                 where: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """A batch (docs/DESIGN.md keys, numpy) holding only prompts, for generation on raw images.

  images: uint8 [h, w, 3] each; phrases: the referring expressions; boxes: per image None or
  {'object': [[x0, y0, x1, y1], ...], 'part': [...]} in original pixels (missing kinds = no proposals, all box
  masks False). The instruction is `instruction_template` with the phrase filled in. `loss_mask` is 1 at the last
  prompt position only (the one that predicts the first answer token). Phrases and boxes are checked first
  (`data.inputs`: no blank phrase, none over the text budget, finite ordered boxes); `where` names each request.
  """
  if len(images) != len(phrases):
    raise ValueError(f"prompt batch: {len(images)} images but {len(phrases)} phrases")
  boxes = [None] * len(images) if boxes is None else list(boxes)
  if len(boxes) != len(images):
    raise ValueError(f"prompt batch: {len(images)} images but {len(boxes)} box entries")
  length = layout.max_text_len
  rows = []
  where = list(where) if where is not None else [f"request {i}" for i in range(len(images))]
  for pixels, phrase, image_boxes, at in zip(images, phrases, boxes, where):
    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    image_boxes = dict(image_boxes or {})
    unknown = set(image_boxes) - {"object", "part"}
    if unknown:
      raise ValueError(f"boxes: unknown kinds {sorted(unknown)}; expected 'object' and/or 'part'")
    row = dict(image_low=transforms.preprocess_image(pixels, layout.image_size_low),    # [S_l, S_l, 3]
               image_high=transforms.preprocess_image(pixels, layout.image_size_high))  # [S_h, S_h, 3]
    for kind, max_boxes in (("object", layout.max_object_boxes), ("part", layout.max_part_boxes)):
      row[f"{kind}_boxes"], row[f"{kind}_box_mask"] = _padded_canvas_boxes(
          inputs.check_boxes(image_boxes.get(kind), f"{at}: boxes[{kind!r}]"), height, width,
          layout.image_size_high, max_boxes)
    phrase, _ = inputs.fit_phrase(
        phrase, lambda p: len(prompt_ids(tokenizer, layout, instruction_template.format(phrase=p))[0]), length, at)
    ids, types = prompt_ids(tokenizer, layout, instruction_template.format(phrase=phrase))
    input_ids = np.full((length,), tokenizer.pad_id, np.int32)  # [L]
    input_ids[:len(ids)] = ids
    token_type = np.zeros((length,), np.int32)  # [L]
    token_type[:len(ids)] = types
    attention_mask = np.arange(length) < len(ids)  # [L]
    for slot_type, box_mask in ((OBJECT_SLOT, row["object_box_mask"]), (PART_SLOT, row["part_box_mask"])):
      attention_mask[np.flatnonzero(token_type == slot_type)] &= box_mask
    target_ids = np.full((length,), tokenizer.pad_id, np.int32)  # [L]
    target_ids[:-1] = input_ids[1:]
    loss_mask = np.zeros((length,), np.float32)  # [L]
    loss_mask[len(ids) - 1] = 1.0
    row.update(input_ids=input_ids, token_type=token_type, attention_mask=attention_mask, target_ids=target_ids,
               loss_mask=loss_mask, seg_index=np.int32(0), has_target=np.bool_(False),
               gt_mask=np.zeros((layout.image_size_high, layout.image_size_high), np.float32))
    rows.append(row)
  batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
  batch["sample_index"] = np.arange(len(rows), dtype=np.int32)
  return batch
