"""Multi-granularity vision flow (MGVF): image, object and part tokens for the LLM.

Image tokens come from the low-res CLIP ViT; object and part tokens are ROI-Aligned from one stage of the
high-res ConvNeXt features at the given boxes. Each group has its own two-layer GELU projector into the LLM
width and a learned granularity embedding, so the LLM can tell the groups apart beyond their marker tokens.

[interpretation] A region token is the average of its ROI-Aligned `roi_output_size²` grid concatenated with the
box's normalised coordinates `(x0, y0, x1, y1, w, h) / S_h`, so position ("the left one") survives pooling.
Padded boxes (mask False) give zero tokens; their slots are also masked out of attention.

LISA's variant (`configs/lisa.py`): `projector = "linear"` (LLaVA-1's single Linear), no granularity embedding,
and `max_object_boxes = max_part_boxes = 0`, which removes the region groups, their projectors and the need for
high-res features altogether (the groups come back as `[B, 0, D]`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from einops import reduce

from unires_jax.models.layers import logical_dense
from unires_jax.sharding import logical_init
from unires_jax.models.roi_align import roi_align

GRANULARITIES = ("image", "object", "part")


@dataclasses.dataclass(frozen=True)
class VisionFlowConfig:
  max_object_boxes: int
  max_part_boxes: int
  roi_output_size: int
  sampling_ratio: int
  roi_feature_stage: int
  projector: str = "mlp2x_gelu"  # a key of PROJECTORS
  granularity_embedding: bool = True

  def __post_init__(self):
    for name in ("roi_output_size", "sampling_ratio"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.vision_flow.{name} must be positive, got {getattr(self, name)}")
    for name in ("max_object_boxes", "max_part_boxes"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.vision_flow.{name} must be >= 0 (0: no such slots), got {getattr(self, name)}")
    if self.projector not in PROJECTORS:
      raise ValueError(f"model.vision_flow.projector {self.projector!r}: expected one of {sorted(PROJECTORS)}")
    if not 0 <= self.roi_feature_stage <= 3:
      raise ValueError(f"model.vision_flow.roi_feature_stage must be a ConvNeXt stage 0..3, "
                       f"got {self.roi_feature_stage}")

  @property
  def uses_region_tokens(self) -> bool:
    """Whether object or part slots exist (and so ROI features from the high-res encoder are needed)."""
    return self.max_object_boxes > 0 or self.max_part_boxes > 0


class Projector(nn.Module):
  """Two-layer GELU MLP into the LLM width (LLaVA-1.5's mlp2x_gelu)."""
  out_features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = logical_dense(self.out_features, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x)
    x = nn.gelu(x, approximate=False)
    return logical_dense(self.out_features, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(x)


class LinearProjector(nn.Module):
  """One Linear into the LLM width (LLaVA-1's and LISA's `mm_projector`)."""
  out_features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return logical_dense(self.out_features, ("embed", "mlp"), "fc", self.dtype, self.param_dtype)(x)


PROJECTORS = {"mlp2x_gelu": Projector, "linear": LinearProjector}


class MultiGranularityVisionFlow(nn.Module):
  config: VisionFlowConfig
  llm_width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def region_tokens(self, features, boxes, box_mask, canvas_size: int, max_boxes: int, what: str):
    """ROI-pool `boxes` [B, N, 4] from `features` [B, h, w, C] → [B, N, C + 6]."""
    if boxes.shape[1] > max_boxes:
      raise ValueError(f"{what} boxes: got {boxes.shape[1]} per image, the configured maximum is {max_boxes} "
                       f"(model.vision_flow.max_{what}_boxes)")
    if boxes.shape[1] < max_boxes:
      raise ValueError(f"{what} boxes: got {boxes.shape[1]} per image; batches are padded to exactly "
                       f"{max_boxes} (model.vision_flow.max_{what}_boxes) with a box mask")
    spatial_scale = features.shape[2] / canvas_size
    pooled = roi_align(features, boxes, output_size=self.config.roi_output_size, spatial_scale=spatial_scale,
                       sampling_ratio=self.config.sampling_ratio, aligned=True)  # [B, N, o, o, C]
    pooled = reduce(pooled, "b n oh ow c -> b n c", "mean")
    x0, y0, x1, y1 = jnp.moveaxis(boxes / canvas_size, -1, 0)
    geometry = jnp.stack([x0, y0, x1, y1, x1 - x0, y1 - y0], axis=-1)  # [B, N, 6]
    tokens = jnp.concatenate([pooled.astype(self.dtype), geometry.astype(self.dtype)], axis=-1)
    return tokens * box_mask[..., None].astype(self.dtype)

  @nn.compact
  def __call__(self, image_features, high_res_features: Sequence[jnp.ndarray] | None, object_boxes, object_box_mask,
               part_boxes, part_box_mask, canvas_size: int) -> dict[str, jnp.ndarray]:
    """image_features [B, Ni, Dv]; high_res_features: ConvNeXt stages [B, h, w, C] (None without region slots);
    boxes on the S_h canvas.

    Returns {'image': [B, Ni, D], 'object': [B, No, D], 'part': [B, Np, D]}.
    """
    cfg = self.config
    batch = image_features.shape[0]
    embedding = None
    if cfg.granularity_embedding:
      embedding = self.param(
          "granularity_embedding",
          logical_init(nn.initializers.normal(0.02), (None, "embed")),
          (len(GRANULARITIES), self.llm_width), self.param_dtype).astype(self.dtype)

    tokens = {"image": image_features.astype(self.dtype)}
    masks = {"image": None, "object": object_box_mask, "part": part_box_mask}
    if cfg.uses_region_tokens:
      if high_res_features is None:
        raise ValueError("vision flow: object/part slots are configured but no high-res features were given")
      stage_features = high_res_features[cfg.roi_feature_stage]
      tokens["object"] = self.region_tokens(stage_features, object_boxes, object_box_mask, canvas_size,
                                            cfg.max_object_boxes, "object")
      tokens["part"] = self.region_tokens(stage_features, part_boxes, part_box_mask, canvas_size,
                                          cfg.max_part_boxes, "part")
    projector_cls = PROJECTORS[cfg.projector]
    out = {}
    for index, name in enumerate(GRANULARITIES):
      if name not in tokens:
        out[name] = jnp.zeros((batch, 0, self.llm_width), self.dtype)  # no slots of this granularity
        continue
      projected = projector_cls(self.llm_width, self.dtype, self.param_dtype, name=f"{name}_projector")(tokens[name])
      if embedding is not None:
        projected = projected + embedding[index]
      if masks[name] is not None:
        projected = projected * masks[name][..., None].astype(self.dtype)
      out[name] = nn.with_logical_constraint(projected, ("activation_batch", "activation_length", "activation_embed"))
    return out
