"""SAM as a point-promptable segmenter: the project's SAM ViT and point-prompted mask decoder, their weights, and the
two jitted steps of automatic mask generation.

Weights come from a folder written by transformers' `SamModel.save_pretrained` (config.json + safetensors, through
`unires_jax/convert/sam_vit.py` and `convert/sam.py`) or from a folder `save_converted` wrote (`params/` +
`config.json`). The steps, each compiled once per shape:

- `embed`: crop canvases [D, S, S, 3] → image embeddings [D, g, g, C];
- `decode`: D work items (one crop's embedding and a batch of P single positive points each) → for each point
  SAM's three masks resized to the crop's pixels on a square canvas (SAM's `postprocess_masks`: bilinear to S, cut
  the resized crop, bilinear to the crop; here one matrix per axis, the product of both resizes), and from them the
  predicted IoU, the stability score, the mask box and the bit-packed binary mask. Only these leave the device.

D is the number of shards of the batch axes of a mesh over the local devices (`unires_jax/sharding.py`); the
leading axis of both steps is split over it and the weights are replicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unires_jax import sharding
from unires_jax.convert import checkpoints
from unires_jax.convert.common import tensor_to_numpy
from unires_jax.convert.sam import import_sam_decoder, mask_decoder_config_from_hf
from unires_jax.convert.sam_vit import import_sam_vit, sam_vit_config_from_hf
from unires_jax.models.mask_decoder import NOT_A_POINT, POSITIVE_POINT, MaskDecoder, MaskDecoderConfig
from unires_jax.models.sam_vit import SamVisionEncoder, SamVitConfig, linear_resize_matrix
from unires_jax.proposals import amg

CONVERTED_CONFIG_KEYS = ("sam_vit", "mask_decoder")


@dataclasses.dataclass(frozen=True)
class SamArchitecture:
  """Encoder and decoder configs of one SAM; the decoder always has point prompts."""
  vit: SamVitConfig
  decoder: MaskDecoderConfig

  def __post_init__(self):
    if not self.decoder.point_prompts:
      object.__setattr__(self, "decoder", dataclasses.replace(self.decoder, point_prompts=True))
    if self.vit.out_channels != self.decoder.transformer_dim:
      raise ValueError(f"SAM: encoder out_channels {self.vit.out_channels} differ from the decoder width "
                       f"{self.decoder.transformer_dim}")

  @property
  def image_size(self) -> int:
    """S: the side of the square canvas the encoder reads."""
    return self.vit.image_size

  @property
  def low_res_size(self) -> int:
    """Side of the decoder's mask logits (4 × the embedding grid)."""
    return 4 * self.vit.grid_size

  def to_dict(self) -> dict:
    return {"sam_vit": dataclasses.asdict(self.vit), "mask_decoder": dataclasses.asdict(self.decoder)}

  @classmethod
  def from_dict(cls, config: Mapping) -> "SamArchitecture":
    missing = [k for k in CONVERTED_CONFIG_KEYS if k not in config]
    if missing:
      raise KeyError(f"SAM architecture: section {missing[0]!r} missing (expected {CONVERTED_CONFIG_KEYS})")
    return cls(SamVitConfig(**dict(config["sam_vit"])), MaskDecoderConfig(**dict(config["mask_decoder"])))

  @classmethod
  def from_model_config(cls, model: ml_collections.ConfigDict) -> "SamArchitecture":
    """From a `model` config section (`configs/common.py`): its `sam_vit` and `mask_decoder`."""
    return cls(SamVitConfig(**model.sam_vit.to_dict()), MaskDecoderConfig(**model.mask_decoder.to_dict()))

  @classmethod
  def from_hf(cls, config: Mapping) -> "SamArchitecture":
    """From a `SamModel` config.json (its `vision_config`, `prompt_encoder_config`, `mask_decoder_config`)."""
    for key in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
      if key not in config:
        raise KeyError(f"SAM config.json: {key!r} missing (is this a SamModel folder?)")
    vision, prompt = config["vision_config"], config["prompt_encoder_config"]
    arch = cls(sam_vit_config_from_hf(vision), mask_decoder_config_from_hf(config["mask_decoder_config"], True))
    dim = arch.decoder.transformer_dim
    if int(vision.get("num_pos_feats", dim // 2)) * 2 != dim:
      raise ValueError(f"SAM config.json: vision_config.num_pos_feats {vision['num_pos_feats']} must be half the "
                       f"decoder width {dim}")
    if int(prompt.get("image_size", arch.image_size)) != arch.image_size:
      raise ValueError(f"SAM config.json: prompt_encoder_config.image_size {prompt['image_size']} differs from "
                       f"vision_config.image_size {arch.image_size}")
    return arch


def import_sam_model(state_dict: Mapping[str, Any], arch: SamArchitecture) -> dict:
  """`SamModel` state dict → {'vision_encoder': ..., 'mask_decoder': ...} (numpy; strict, naming tensors)."""
  weights = {name: tensor_to_numpy(state_dict[name]) for name in state_dict}
  return {"vision_encoder": import_sam_vit(weights, arch.vit),
          "mask_decoder": import_sam_decoder({k: v for k, v in weights.items()
                                              if not k.startswith("vision_encoder.")}, arch.decoder)}


def load_sam(checkpoint: str) -> tuple[SamArchitecture, dict]:
  """(architecture, params) from a `SamModel.save_pretrained` folder or a `save_converted` folder."""
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"SAM checkpoint {checkpoint!r} is not a folder (expected a SamModel.save_pretrained "
                            f"folder or one written by save_converted)")
  config_path = os.path.join(checkpoint, checkpoints.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"SAM checkpoint {checkpoint!r}: {checkpoints.CONFIG_FILE} missing")
  with open(config_path) as f:
    config = json.load(f)
  if os.path.isdir(os.path.join(checkpoint, checkpoints.PARAMS_DIR)):
    params, _ = checkpoints.load_params(checkpoint)
    return SamArchitecture.from_dict(config), params
  arch = SamArchitecture.from_hf(config)
  return arch, import_sam_model(checkpoints.TensorReader(checkpoint), arch)


def save_converted(directory: str, arch: SamArchitecture, params: Mapping) -> str:
  """Writes `directory/params` (Orbax) and `directory/config.json`; `load_sam(directory)` reads them back."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, checkpoints.CONFIG_FILE), "w") as f:
    json.dump(arch.to_dict(), f, indent=1)
  return checkpoints.save_params(directory, jax.tree.map(np.asarray, dict(params)))


def init_params(arch: SamArchitecture, rng: jax.Array) -> dict:
  """Random weights (tests and benchmarks only: a source built on them says so)."""
  vit_rng, decoder_rng = jax.random.split(rng)
  size, dim = arch.image_size, arch.decoder.transformer_dim
  vit = jax.jit(SamVisionEncoder(arch.vit).init)(vit_rng, jnp.zeros((1, size, size, 3)))
  decoder = jax.jit(lambda r: MaskDecoder(arch.decoder).init(
      r, jnp.zeros((1, arch.vit.grid_size, arch.vit.grid_size, dim)), None, True,
      point_coords=jnp.zeros((1, 2, 2)), point_labels=jnp.ones((1, 2), jnp.int32)))(decoder_rng)
  return {"vision_encoder": nn.meta.unbox(vit)["params"], "mask_decoder": nn.meta.unbox(decoder)["params"]}


@dataclasses.dataclass(frozen=True)
class CropGeometry:
  """How one crop's masks leave the decoder: logits [s, s] → rows @ logits @ colsᵀ on a square canvas of side
  `canvas`, equal to SAM's bilinear resize to S, cut to the resized crop, bilinear resize to the crop's pixels.
  Canvas rows and columns past the crop have zero weights and are marked invalid."""
  rows: np.ndarray  # float32 [canvas, s]
  cols: np.ndarray  # float32 [canvas, s]
  valid_rows: np.ndarray  # bool [canvas]
  valid_cols: np.ndarray


def _crop_resize(low_res: int, image_size: int, resized: int, crop: int, canvas: int) -> np.ndarray:
  """[canvas, low_res]: resize low_res → image_size, keep the first `resized`, resize those to `crop` (float64
  product of torch's two linear resizes), zero-padded to `canvas` rows."""
  to_canvas = linear_resize_matrix(low_res, image_size).astype(np.float64)[:resized]  # [resized, s]
  to_crop = linear_resize_matrix(resized, crop).astype(np.float64) @ to_canvas  # [crop, s]
  return np.pad(to_crop, ((0, canvas - crop), (0, 0))).astype(np.float32)


def crop_geometry(crop_height: int, crop_width: int, image_size: int, low_res_size: int, canvas: int
                  ) -> CropGeometry:
  """The resize matrices of a crop_height × crop_width crop (its resized part is the top-left
  `longest_side_shape` of the S canvas), on a `canvas` × `canvas` mask canvas."""
  if canvas < max(crop_height, crop_width):
    raise ValueError(f"mask canvas {canvas} is smaller than the crop {crop_height}x{crop_width}")
  resized_h, resized_w = amg.longest_side_shape(crop_height, crop_width, image_size)
  return CropGeometry(rows=_crop_resize(low_res_size, image_size, resized_h, crop_height, canvas),
                      cols=_crop_resize(low_res_size, image_size, resized_w, crop_width, canvas),
                      valid_rows=np.arange(canvas) < crop_height, valid_cols=np.arange(canvas) < crop_width)


class SamSegmenter:
  """The jitted encoder and point-batch decoder over a data-parallel mesh of `devices` (default: local devices)."""

  def __init__(self, arch: SamArchitecture, params: Mapping, mask_threshold: float = 0.0,
               stability_offset: float = 1.0, dtype: str = "float32", devices: Sequence[jax.Device] | None = None):
    self.arch = arch
    self.mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                                   list(devices) if devices is not None else jax.local_devices())
    self.num_shards = sharding.batch_size_per_data_shard(self.mesh)
    self.batch_sharding = NamedSharding(self.mesh, P(sharding.BATCH_AXES))
    replicated = NamedSharding(self.mesh, P())
    self.params = jax.device_put(jax.tree.map(jnp.asarray, dict(params)), replicated)
    self.mask_threshold, self.stability_offset = float(mask_threshold), float(stability_offset)
    compute_dtype = jnp.dtype(dtype)
    self._encoder = SamVisionEncoder(arch.vit, dtype=compute_dtype)
    self._decoder = MaskDecoder(arch.decoder, dtype=compute_dtype)
    self.embed = jax.jit(self._embed, in_shardings=(replicated, self.batch_sharding),
                         out_shardings=self.batch_sharding)
    self.decode = jax.jit(self._decode, in_shardings=(replicated,) + (self.batch_sharding,) * 5,
                          out_shardings=self.batch_sharding)

  def _embed(self, params, canvases):
    """canvases [D, S, S, 3] (SAM-normalised) → embeddings [D, g, g, C] float32."""
    return self._encoder.apply({"params": params["vision_encoder"]}, canvases).astype(jnp.float32)

  def _decode(self, params, embeddings, points, rows, cols, valid):
    """embeddings [D, g, g, C], points [D, P, 2] (x, y in [0, 1] of the S canvas), `CropGeometry` rows / cols
    [D, canvas, s], valid (rows, cols) bool [D, canvas] → per item and point, for SAM's 3 masks: `iou` [D, P, 3],
    `stability` [D, P, 3], `boxes` int32 [D, P, 3, 4] (inclusive), `area` int32 [D, P, 3], `packed` uint8
    [D, P, 3, canvas, canvas / 8] (the binary masks, bits along columns)."""
    items, num_points = points.shape[:2]
    images = jnp.repeat(embeddings, num_points, axis=0)  # [D·P, g, g, C]
    # One positive point and SAM's not-a-point padding token per prompt (no box prompt).
    coords = jnp.concatenate([points.reshape(items * num_points, 1, 2),
                              jnp.zeros((items * num_points, 1, 2), points.dtype)], axis=1)  # [D·P, 2, 2]
    labels = jnp.broadcast_to(jnp.asarray([POSITIVE_POINT, NOT_A_POINT], jnp.int32), coords.shape[:2])
    low_res, iou = self._decoder.apply({"params": params["mask_decoder"]}, images, None, True,
                                       point_coords=coords, point_labels=labels)  # [D·P, 3, s, s], [D·P, 3]
    low_res = low_res.reshape(items, num_points, *low_res.shape[1:])  # [D, P, 3, s, s]
    exact = jax.lax.Precision.HIGHEST  # no reduced-precision matmuls (TF32) near the thresholds
    logits = jnp.einsum("dys,dpmst->dpmyt", rows, low_res, precision=exact)  # [D, P, 3, canvas, s]
    logits = jnp.einsum("dpmyt,dxt->dpmyx", logits, cols, precision=exact)  # [D, P, 3, canvas, canvas]
    valid_rows, valid_cols = valid
    pixels = (valid_rows[:, :, None] & valid_cols[:, None, :])[:, None, None]  # [D, 1, 1, canvas, canvas]
    binary = (logits > self.mask_threshold) & pixels
    return {"iou": iou.reshape(items, num_points, -1),
            "stability": amg.stability_score(logits, pixels, self.mask_threshold, self.stability_offset, xp=jnp),
            "boxes": amg.mask_boxes(binary, xp=jnp),
            "area": jnp.sum(binary, axis=(-2, -1), dtype=jnp.int32),
            "packed": jnp.packbits(binary, axis=-1)}

  def shard(self, array: np.ndarray) -> jax.Array:
    """A host array whose leading axis is D, placed over the mesh's batch axes."""
    return jax.device_put(array, self.batch_sharding)
