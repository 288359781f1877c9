"""`Predictor`: a trained checkpoint loaded once, segmenting what phrases name in raw images, in padded batches.

    predictor = Predictor("runs/toy", batch_size=8)
    results = predictor.predict([pixels], ["the roof of the green house"])  # pixels: uint8 [h, w, 3]
    results[0].mask, results[0].answer, results[0].no_target, results[0].proposals

Used by `scripts/predict.py` (and meant for a web demo). The checkpoint, its params (placed on the mesh), the
tokenizer and the jitted generation are built once; every call is cut into batches of `batch_size` rows (rounded
up to the mesh's batch shards) and the last one padded, so one compiled shape serves every call. Rows do not see
each other: padding and other rows change no answer or mask (tests/test_predict.py checks batch 1 against 8).

Boxes: per image, given boxes (`{'object': [[x0, y0, x1, y1], ...], 'part': [...]}` in original pixels) or, when
none are given, proposals from the run's configured source (`config.proposals` of the run; `none` when the run
names none, or names the ground-truth source, which a new image has nothing for). `source_note` says which.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from unires_jax import proposals as proposals_lib
from unires_jax import sharding
from unires_jax.data import prompts
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.eval import answers as answers_lib
from unires_jax.eval import checkpoint_io, inference, predict_fns
from unires_jax.models import unires as unires_lib

log = logging.getLogger(__name__)

GIVEN = "given boxes"


@dataclasses.dataclass(frozen=True)
class PredictionResult:
  """One image and phrase: the generated answer, the mask (bool [h, w], empty without `[SEG]`), whether the answer
  said no target or could not be parsed (answers.py), and the boxes the model read (original pixels, with their
  source)."""
  answer: str
  mask: np.ndarray
  no_target: bool
  invalid: bool
  proposals: dict


def _run_source(config: ml_collections.ConfigDict, override: ml_collections.ConfigDict | None
                ) -> tuple[proposals_lib.ProposalSource, str]:
  """(source, a note saying where it came from) for images without given boxes."""
  if override is not None:
    source = proposals_lib.build_source(override)
    return source, f"proposals from {source.describe()} (as asked)"
  section = config.get("proposals", None)
  none = ml_collections.ConfigDict({"source": "none"})
  if section is None:
    return (proposals_lib.build_source(none),
            "the run config has no proposals section: no boxes (every object and part slot is masked)")
  source = proposals_lib.build_source(section)
  if source.is_ground_truth:
    return (proposals_lib.build_source(none),
            f"the run's proposal source is {source.describe()}, which a new image has no annotations for: no boxes")
  return source, f"proposals from the run's source {source.describe()}"


class Predictor:
  """A checkpoint ready for prediction. `devices` (default: all) and the run's mesh config give the mesh."""

  def __init__(self, checkpoint: str, *, step: int | None = None, batch_size: int = 8,
               max_new_tokens: int | None = None, proposals: ml_collections.ConfigDict | None = None,
               devices: Sequence[Any] | None = None):

    loaded = checkpoint_io.load_checkpoint(checkpoint, step)
    config = ml_collections.ConfigDict(loaded.config.to_dict())
    if max_new_tokens is not None:
      config.generation = dict(config.get("generation", {}), max_new_tokens=int(max_new_tokens))
    self.config = config
    self.checkpoint, self.step = os.path.dirname(loaded.item_dir), loaded.step
    self.mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.sharding_rules)
    shards = sharding.batch_size_per_data_shard(self.mesh)
    self.batch_size = -(-max(1, int(batch_size)) // shards) * shards  # rounded up to fill the batch axes
    model = unires_lib.build_model(config.model)
    self.params = inference.place_params(model, config.model, loaded.params, self.mesh, rules)
    self.tokenizer = tokenizer_lib.Tokenizer(config.data.tokenizer_path)
    self.answer_parser = answers_lib.AnswerParser.from_config(config, self.tokenizer)
    # One jitted function; its one compiled shape is [batch_size, ...] since every batch is padded to it.
    self._predict_fn = predict_fns.make_predict_fn(model, config, self.mesh, rules)
    self.source, self.source_note = _run_source(config, proposals)
    self.max_boxes = {"object": int(config.model.vision_flow.max_object_boxes),
                      "part": int(config.model.vision_flow.max_part_boxes)}

  def propose(self, images: Sequence[np.ndarray]) -> list[dict]:
    """The source's boxes per image: {'object': [[x0, y0, x1, y1], ...], 'part': [...], 'source': str}."""
    inputs = [proposals_lib.ImageInput(image_id=i, file_name="", height=int(p.shape[0]), width=int(p.shape[1]),
                                       pixels=lambda p=p: np.asarray(p, np.uint8))
              for i, p in enumerate(images)]
    found = self.source(inputs) if inputs else []
    return [entry.to_record(self.source.describe()) for entry in found]

  def _boxes_used(self, images: Sequence[np.ndarray], boxes: Sequence[Mapping | None] | None) -> list[dict]:
    """Per image the boxes the model reads (given, else proposed), cut to its slots as the pipeline cuts them."""
    boxes = [None] * len(images) if boxes is None else list(boxes)
    if len(boxes) != len(images):
      raise ValueError(f"Predictor.predict: {len(images)} images but {len(boxes)} box entries")
    missing = [i for i, entry in enumerate(boxes) if entry is None]
    proposed = dict(zip(missing, self.propose([images[i] for i in missing])))
    used = []
    for i, entry in enumerate(boxes):
      chosen = proposed[i] if entry is None else {**entry, "source": GIVEN}
      unknown = set(chosen) - {"object", "part", "source", "object_scores", "part_scores"}
      if unknown:
        raise ValueError(f"boxes of image {i}: unknown kinds {sorted(unknown)}; expected 'object' and/or 'part'")
      used.append({"source": chosen["source"],
                   **{kind: prompts.kept_boxes(chosen.get(kind), count).tolist()
                      for kind, count in self.max_boxes.items()}})
    return used

  def predict(self, images: Sequence[np.ndarray], phrases: Sequence[str],
              boxes: Sequence[Mapping | None] | None = None,
              where: Sequence[str] | None = None) -> list[PredictionResult]:
    """One result per (image, phrase): images uint8 [h, w, 3]; `boxes` per image None (proposed) or given;
    `where` names each request in errors about its phrase or boxes."""
    if len(images) != len(phrases):
      raise ValueError(f"Predictor.predict: {len(images)} images but {len(phrases)} phrases")
    images = [np.asarray(image, np.uint8) for image in images]
    used = self._boxes_used(images, boxes)
    results = []
    for start in range(0, len(images), self.batch_size):
      chunk = slice(start, start + self.batch_size)
      chunk_images, chunk_phrases, chunk_boxes = images[chunk], list(phrases[chunk]), used[chunk]
      batch = inference.make_prompt_batch(self.config, self.tokenizer, chunk_images, chunk_phrases,
                                          [{k: b[k] for k in self.max_boxes} for b in chunk_boxes],
                                          None if where is None else list(where)[chunk])
      outputs = self._predict_fn(self.params, inference.pad_batch(batch, self.batch_size))
      rows = len(chunk_images)
      has_seg = np.asarray(outputs["has_seg"][:rows], bool)  # [rows]
      masks = inference.masks_to_original(outputs, [image.shape[:2] for image in chunk_images])
      tokens = np.asarray(outputs["tokens"][:rows])  # [rows, T]
      for row in range(rows):
        text = self.answer_parser.text(tokens[row])
        kind = self.answer_parser.kind(text, bool(has_seg[row]), chunk_phrases[row])
        results.append(PredictionResult(answer=text, mask=masks[row], no_target=not has_seg[row],
                                        invalid=kind == answers_lib.INVALID, proposals=chunk_boxes[row]))
    return results
