"""The `sam` proposal source against a reference built from transformers' `SamModel` and `SamImageProcessorPil`
(`generate_crop_boxes`, `post_process_masks`, `filter_masks`) with NMS written from torchvision's definition, on the
same tiny random weights, image and grid; plus hand-computed cases for each piece."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from unires_jax.convert import sam as sam_convert
from unires_jax.models.mask_decoder import DensePromptEncoder, MaskDecoder, MaskDecoderConfig
from unires_jax.proposals import ImageInput, build_source
from unires_jax.proposals import amg, sam_model
from unires_jax.proposals.sam import AmgOptions, SamAutomaticMasks, _Masks, clean_small_regions

S, DIM = 64, 32  # encoder canvas and decoder width of the tiny SAM
# Filters for random weights: the logits are large (×10 hypernetwork outputs), so a high mask threshold gives compact
# masks whose boxes differ; thresholds are not simple fractions, so no stability ratio sits exactly on one.
TEST_OPTIONS = dict(points_per_side=8, points_per_batch=24, pred_iou_thresh=0.5, stability_score_thresh=0.9123,
                    mask_threshold=200.0, box_nms_thresh=0.7, crop_nms_thresh=0.7, crop_n_layers=1)


def _image(height=180, width=240, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  image = np.full((height, width, 3), 40, np.int64)
  image[height // 9:height // 2, width // 8:width * 5 // 8] = (200, 60, 60)
  image[height // 3:height * 17 // 18, width // 2:width * 23 // 24] = (40, 180, 90)
  image[height * 11 // 18:height * 5 // 6, width // 12:width // 3] = (250, 250, 30)
  return np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)


def _image_input(pixels: np.ndarray, image_id: int = 1) -> ImageInput:
  return ImageInput(image_id=image_id, file_name=f"{image_id}.png", height=pixels.shape[0], width=pixels.shape[1],
                    pixels=lambda: pixels)


def _config(**overrides):
  config = common.proposals_config("sam")
  config.sam.update({**TEST_OPTIONS, "part_levels": (), **overrides})  # part_levels (): every mask an object
  return config


# --- the transformers reference ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.SamConfig(
      vision_config=transformers.SamVisionConfig(
          hidden_size=32, output_channels=DIM, num_hidden_layers=2, num_attention_heads=2, image_size=S,
          patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=DIM // 2),
      prompt_encoder_config=transformers.SamPromptEncoderConfig(hidden_size=DIM, image_size=S, patch_size=16,
                                                                mask_input_channels=8),
      mask_decoder_config=transformers.SamMaskDecoderConfig(hidden_size=DIM, mlp_dim=64, num_hidden_layers=2,
                                                            num_attention_heads=4, iou_head_hidden_dim=32))
  torch.manual_seed(0)
  model = transformers.SamModel(config).eval()
  with torch.no_grad():  # every weight random; decoder biases zero, so masks are not dominated by one sign
    for name, param in model.named_parameters():
      param.normal_(0.0, 0.6)
      if name.startswith("mask_decoder.") and name.endswith(".bias"):
        param.zero_()
    for name, param in model.named_parameters():
      if "output_hypernetworks_mlps" in name and "proj_out" in name:
        param.mul_(10.0)
      if "iou_prediction_head" in name:
        param.mul_(0.25)
    model.mask_decoder.iou_prediction_head.proj_out.bias.add_(0.5)
  return model


@pytest.fixture(scope="module")
def checkpoint_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("sam_checkpoint")
  hf_model.save_pretrained(str(path))
  return str(path)


def _reference_nms(boxes, scores, iou_threshold):
  """torchvision's CPU `nms`, one box at a time (ties in score kept in input order)."""
  boxes, scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
  order = sorted(range(len(scores)), key=lambda i: -scores[i])
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  suppressed, keep = [False] * len(boxes), []
  for position, i in enumerate(order):
    if suppressed[i]:
      continue
    keep.append(i)
    for j in order[position + 1:]:
      if suppressed[j]:
        continue
      width = max(np.float32(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
      height = max(np.float32(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
      inter = np.float32(width * height)
      with np.errstate(invalid="ignore", divide="ignore"):
        overlap = inter / (areas[i] + areas[j] - inter)
      if float(overlap) > iou_threshold:
        suppressed[j] = True
  return keep


def _reference_amg(model, image, options):
  """segment-anything's generator on transformers' pieces: boxes (inclusive, image frame) and predicted IoUs."""
  import torch
  from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

  processor = SamImageProcessorPil(size={"longest_edge": S}, pad_size={"height": S, "width": S})
  crop_boxes, points, crops, labels = processor.generate_crop_boxes(
      image, S, crop_n_layers=options["crop_n_layers"], overlap_ratio=512 / 1500,
      points_per_crop=options["points_per_side"])
  inputs = processor(images=crops, return_tensors="pt")
  image_size = inputs["original_sizes"][0].tolist()
  batch = options["points_per_batch"]
  boxes, scores, crop_of = [], [], []
  with torch.no_grad():
    for c in range(len(crops)):
      embedding = model.get_image_embeddings(inputs["pixel_values"][c:c + 1])
      crop_boxes_found, crop_scores = [], []
      for first in range(0, points.shape[1], batch):
        out = model(image_embeddings=embedding, input_points=points[:, first:first + batch, c:c + 1].float(),
                    input_labels=labels[:, first:first + batch, c:c + 1], multimask_output=True)
        masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"][c:c + 1],
                                             inputs["reshaped_input_sizes"][c:c + 1], binarize=False)
        _, kept_scores, kept_boxes = processor.filter_masks(
            masks[0], out.iou_scores[0], image_size, crop_boxes[c], options["pred_iou_thresh"],
            options["stability_score_thresh"], options["mask_threshold"], 1.0)
        crop_boxes_found.append(kept_boxes.numpy())
        crop_scores.append(kept_scores.numpy())
      found, found_scores = np.concatenate(crop_boxes_found), np.concatenate(crop_scores)
      keep = _reference_nms(found, found_scores, options["box_nms_thresh"])
      boxes.append(found[keep])
      scores.append(found_scores[keep])
      crop_of += [c] * len(keep)
  boxes, scores = np.concatenate(boxes), np.concatenate(scores)
  if len(crops) > 1:
    crop_areas = ((crop_boxes[:, 2] - crop_boxes[:, 0]) * (crop_boxes[:, 3] - crop_boxes[:, 1])).numpy()
    keep = _reference_nms(boxes, (1.0 / crop_areas[crop_of]).astype(np.float32), options["crop_nms_thresh"])
    boxes, scores = boxes[keep], scores[keep]
  return boxes, scores, len(crops)


@pytest.mark.torch
def test_matches_transformers_reference(hf_model, checkpoint_dir):
  image = _image()
  want_boxes, want_scores, num_crops = _reference_amg(hf_model, image, TEST_OPTIONS)
  assert num_crops == 5
  assert len(want_boxes) >= 20  # a comparison over many kept masks, from several crops

  source = build_source(_config(checkpoint=checkpoint_dir))  # the registry path, weights from save_pretrained
  (found,) = source([_image_input(image)])
  assert len(found.part_boxes) == 0
  assert len(found.object_boxes) == len(want_boxes)
  order = np.argsort(-want_scores, kind="stable")
  want_extents = want_boxes[order].astype(np.float32) + np.asarray([0, 0, 1, 1], np.float32)  # pixel extents
  np.testing.assert_allclose(found.object_boxes, want_extents, atol=1.0, rtol=0)
  np.testing.assert_allclose(found.object_scores, want_scores[order], atol=1e-4, rtol=0)
  assert np.all(np.diff(found.object_scores) <= 0)  # best first
  assert "sam_checkpoint" in source.describe() and "points_per_side=8" in source.describe()


@pytest.mark.torch
def test_sharded_batch_equals_one_device_image_by_image(hf_model):
  if len(jax.devices()) < 2:
    pytest.skip("needs several devices (tests/conftest.py fakes 8 CPU devices)")
  arch = sam_model.SamArchitecture.from_hf(hf_model.config.to_dict())
  params = sam_model.import_sam_model(hf_model.state_dict(), arch)
  config = _config(crop_n_layers=0, part_levels=(0, 1))
  options = AmgOptions.from_config(config.sam)
  images = [_image(), _image(130, 100, seed=1)]  # two sizes: two mask canvases

  def source(devices):
    segmenter = SamAutomaticMasks.make_segmenter(arch, params, options, devices=devices)
    assert segmenter.num_shards == len(devices)
    return SamAutomaticMasks(config, segmenter=segmenter, weights="test")

  batched = source(jax.devices())([_image_input(p, i) for i, p in enumerate(images)])
  single = source(jax.devices()[:1])
  for index, pixels in enumerate(images):
    (alone,) = single([_image_input(pixels, index)])
    assert len(alone.object_boxes) + len(alone.part_boxes) > 0
    for field in ("object_boxes", "part_boxes", "object_scores", "part_scores"):
      np.testing.assert_allclose(getattr(batched[index], field), getattr(alone, field), atol=1e-5, err_msg=field)


@pytest.mark.torch
def test_point_prompt_embedding_matches_hf_prompt_encoder(hf_model):
  import torch
  cfg = MaskDecoderConfig(transformer_dim=DIM, depth=2, num_heads=4, mlp_dim=64, iou_head_hidden_dim=32,
                          point_prompts=True)
  params = sam_convert.import_sam_decoder(hf_model.state_dict(), cfg)
  pixels = np.asarray([[[3.0, 60.0], [40.5, 7.25], [0.0, 0.0]]], np.float32)  # [1, 3, 2] on the S canvas
  labels = np.asarray([[1, 0, -1]], np.int64)
  with torch.no_grad():
    sparse, _ = hf_model.prompt_encoder(torch.from_numpy(pixels)[:, None], torch.from_numpy(labels)[:, None],
                                        None, None)
  want = sparse.numpy()[0, 0]  # [3, C]; boxes absent → HF adds one padding token
  assert want.shape == (4, DIM)
  coords = np.concatenate([pixels, np.zeros((1, 1, 2), np.float32)], axis=1)  # the padding point
  labels = np.concatenate([labels, [[-1]]], axis=1)
  got = DensePromptEncoder(cfg).apply({"params": params["prompt_encoder"]}, jnp.asarray((coords + 0.5) / S),
                                     jnp.asarray(labels), method=DensePromptEncoder.embed_points)
  np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-5)


@pytest.mark.torch
def test_point_prompted_decoder_matches_hf(hf_model):
  import torch
  arch = sam_model.SamArchitecture.from_hf(hf_model.config.to_dict())
  params = sam_model.import_sam_model(hf_model.state_dict(), arch)
  embeddings = np.random.default_rng(3).normal(size=(1, 4, 4, DIM)).astype(np.float32)
  points = np.asarray([[[5.0, 9.0]], [[50.0, 30.0]]], np.float32)  # two single-point prompts
  with torch.no_grad():
    out = hf_model(image_embeddings=torch.from_numpy(embeddings).permute(0, 3, 1, 2),
                   input_points=torch.from_numpy(points)[None], input_labels=torch.ones((1, 2, 1), dtype=torch.long),
                   multimask_output=True)
  coords = np.concatenate([points, np.zeros((2, 1, 2), np.float32)], axis=1)  # + SAM's not-a-point padding
  masks, iou = MaskDecoder(arch.decoder).apply(
      {"params": params["mask_decoder"]}, jnp.asarray(np.repeat(embeddings, 2, axis=0)), None, True,
      point_coords=jnp.asarray((coords + 0.5) / S), point_labels=jnp.asarray([[1, -1], [1, -1]]))
  np.testing.assert_allclose(np.asarray(iou), out.iou_scores.numpy()[0], atol=1e-4)
  want = out.pred_masks.numpy()[0]
  assert np.abs(want).max() > 1.0
  # The test weights make logits of a few hundred; float32 agreement relative to that scale.
  np.testing.assert_allclose(np.asarray(masks), want, atol=5e-5 * np.abs(want).max(), rtol=0)  # float32 round-off


@pytest.mark.torch
def test_checkpoint_loading_and_converted_round_trip(hf_model, checkpoint_dir, tmp_path):
  arch, params = sam_model.load_sam(checkpoint_dir)
  assert arch.decoder.point_prompts and arch.image_size == S and arch.vit.depth == 2
  want = sam_model.import_sam_model(hf_model.state_dict(), arch)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  sam_model.save_converted(str(tmp_path / "converted"), arch, params)
  again_arch, again = sam_model.load_sam(str(tmp_path / "converted"))
  assert again_arch == arch
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_load_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a folder"):
    sam_model.load_sam(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="config.json missing"):
    sam_model.load_sam(str(tmp_path))
  (tmp_path / "config.json").write_text('{"vision_config": {}}')
  with pytest.raises(KeyError, match="prompt_encoder_config"):
    sam_model.load_sam(str(tmp_path))


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="proposals.sam.checkpoint is empty"):
    build_source(common.proposals_config("sam"))
  with pytest.raises(ValueError, match="points_per_batch"):
    AmgOptions.from_config({**TEST_OPTIONS, "points_per_batch": 0})
  with pytest.raises(ValueError, match="part_levels"):
    AmgOptions.from_config({"part_levels": (3,)})
  with pytest.raises(KeyError, match="points_per_sid"):
    AmgOptions.from_config({"points_per_sid": 4})
  with pytest.raises(ValueError, match="no point in the last layer"):
    AmgOptions.from_config({"points_per_side": 2, "crop_n_layers": 2, "crop_n_points_downscale_factor": 2})
  assert AmgOptions.from_config(common.proposals_config("sam").sam) == AmgOptions()  # one set of defaults


def test_default_decoder_has_no_point_parameters():
  """UniRES's decoder (point_prompts off) keeps its parameter tree and conversion table."""
  cfg = MaskDecoderConfig(**common.model_config("tiny").mask_decoder.to_dict())
  names = [e.jax_path for e in sam_convert.sam_decoder_table(cfg)]
  assert not [n for n in names if "point" in n]
  with_points = [e.jax_path for e in sam_convert.sam_decoder_table(dataclasses.replace(cfg, point_prompts=True))]
  assert sorted(set(with_points) - set(names)) == ["prompt_encoder/not_a_point_embed/embedding",
                                                   "prompt_encoder/point_embed_0/embedding",
                                                   "prompt_encoder/point_embed_1/embedding"]


# --- hand-computed pieces ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("xp", [np, jnp])
def test_stability_score_hand_computed(xp):
  logits = xp.asarray([[-2.0, 0.5, 2.0], [1.5, -0.5, 3.0], [0.0, 0.0, 0.0]], xp.float32)
  every = xp.ones((3, 3), bool)
  # > 1: {2, 1.5, 3} = 3 pixels; > -1: 8 pixels (all but -2).
  assert float(amg.stability_score(logits, every, 0.0, 1.0, xp=xp)) == pytest.approx(3 / 8)
  top_rows = xp.asarray([[True] * 3, [True] * 3, [False] * 3])
  assert float(amg.stability_score(logits, top_rows, 0.0, 1.0, xp=xp)) == pytest.approx(3 / 5)
  # threshold 1, offset 0.5: > 1.5 → {2, 3}; > 0.5 → {2, 1.5, 3}.
  assert float(amg.stability_score(logits, every, 1.0, 0.5, xp=xp)) == pytest.approx(2 / 3)


@pytest.mark.parametrize("xp", [np, jnp])
def test_mask_boxes_hand_computed(xp):
  masks = np.zeros((2, 5, 6), bool)
  masks[0, 1, 2] = masks[0, 3, 4] = True
  boxes = np.asarray(amg.mask_boxes(xp.asarray(masks), xp=xp))
  np.testing.assert_array_equal(boxes, [[2, 1, 4, 3], [0, 0, 0, 0]])  # inclusive; empty → zeros


def test_nms_hand_computed():
  boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 20, 30]]
  scores = [0.9, 0.8, 0.95, 0.1]
  # C (0.95) first; A has IoU 1 with it; B has IoU 81 / 119 = 0.68; D has zero area (IoU 0/0, never suppressed).
  np.testing.assert_array_equal(amg.nms(boxes, scores, 0.7), [2, 1, 3])
  np.testing.assert_array_equal(amg.nms(boxes, scores, 0.6), [2, 3])
  np.testing.assert_array_equal(amg.nms([[0, 0, 4, 4], [0, 0, 4, 4]], [0.5, 0.5], 0.7), [0])  # tie: input order
  assert amg.nms(np.zeros((0, 4)), np.zeros((0,)), 0.7).shape == (0,)


def test_crop_boxes_hand_computed():
  boxes, layers = amg.crop_boxes(180, 240, 1, 512 / 1500)
  # overlap int(0.3413 · 180) = 61; crop 151 × 121; left/top starts 0, 90 / 0, 60; x-major order.
  np.testing.assert_array_equal(boxes, [[0, 0, 240, 180], [0, 0, 151, 121], [0, 60, 151, 180],
                                        [90, 0, 240, 121], [90, 60, 240, 180]])
  np.testing.assert_array_equal(layers, [0, 1, 1, 1, 1])
  assert len(amg.crop_boxes(100, 100, 2, 0.3)[0]) == 1 + 4 + 16


def test_point_grid_hand_computed():
  np.testing.assert_allclose(amg.point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
  assert [len(g) for g in amg.layer_point_grids(8, 2, 2)] == [64, 16, 4]
  assert amg.longest_side_shape(180, 240, 64) == (48, 64)
  assert amg.longest_side_shape(121, 150, 64) == (52, 64)  # 51.63 rounds up


def test_near_crop_edge_hand_computed():
  crop, image = (0, 0, 151, 121), (0, 0, 240, 180)
  boxes = [[10, 10, 140, 50],  # right side 11 px from the crop's inner edge
           [10, 10, 100, 50],  # clear of every inner edge
           [0, 0, 30, 30]]  # on the crop's left / top edges, which are image edges
  np.testing.assert_array_equal(amg.near_crop_edge(boxes, crop, image, 20.0), [True, False, False])
  np.testing.assert_array_equal(amg.near_crop_edge(boxes, crop, image, 10.0), [False, False, False])


def test_remove_small_regions_hand_computed():
  square = np.zeros((7, 7), bool)
  square[1:6, 1:6] = True
  square[3, 3] = False  # a 1-pixel hole
  filled, changed = amg.remove_small_regions(square, 2, "holes")
  assert changed and filled[3, 3] and filled.sum() == 25
  same, changed = amg.remove_small_regions(square, 2, "islands")
  assert not changed and same is square

  island = np.zeros((7, 7), bool)
  island[1:4, 1:4] = True
  island[4, 4] = True  # touches the square diagonally: 8-connected, so not an island
  island[6, 0] = True  # a 1-pixel island
  dropped, changed = amg.remove_small_regions(island, 2, "islands")
  assert changed and dropped[4, 4] and not dropped[6, 0] and dropped.sum() == 10

  tiny = np.zeros((5, 5), bool)
  tiny[0, 0] = tiny[4, 4] = tiny[4, 3] = True  # every island under 5 px: the largest stays
  kept, changed = amg.remove_small_regions(tiny, 5, "islands")
  assert changed and kept.sum() == 2 and kept[4, 4] and not kept[0, 0]
  with pytest.raises(ValueError, match="mode"):
    amg.remove_small_regions(tiny, 5, "both")


def test_clean_small_regions_recomputes_boxes_and_prefers_unchanged_masks():
  full = np.zeros((3, 12, 12), bool)
  full[0, 2:8, 2:8] = True
  full[0, 11, 11] = True  # island: its box shrinks from (2, 2, 11, 11) to (2, 2, 7, 7) after the clean-up
  full[1, 2:8, 2:8] = True  # the same square, needing no clean-up
  full[2, 0:2, 9:12] = True
  boxes = np.asarray(amg.mask_boxes(full), np.int64)
  masks = _Masks(boxes, np.asarray([0.9, 0.5, 0.7], np.float32), np.zeros(3, np.int64), np.zeros(3, np.int64),
                 [None] * 3)
  kept, cleaned = clean_small_regions(masks, full, 4, 0.7)
  # Mask 0 and 1 now coincide; NMS keeps the unchanged one (1) although its predicted IoU is lower.
  np.testing.assert_array_equal(kept.scores, np.float32([0.5, 0.7]))
  np.testing.assert_array_equal(kept.boxes, [[2, 2, 7, 7], [9, 0, 11, 1]])
  assert cleaned.shape == (2, 12, 12) and cleaned[0].sum() == 36


def test_part_rule_hand_computed():
  masks = np.zeros((6, 20, 20), bool)
  masks[0, 0:10, 0:10] = True  # A: area 100, whole level
  masks[1, 2:6, 2:7] = True  # B: area 20 inside A, part level → part
  masks[2, 1:9, 1:9] = True  # C: area 64 inside A but whole level → object
  masks[3, 8:12, 8:13] = True  # D: area 20, only 4 of its pixels in A → object
  masks[4, 2:4, 2:7] = True  # E: area 10 inside B (2× larger) and A → part
  masks[5, 0:10, 0:9] = True  # F: area 90 inside A, but A is not 1.5× larger → object
  levels = np.asarray([2, 1, 2, 0, 0, 1])
  flags = amg.part_flags(masks, levels, part_levels=(0, 1), containment=0.9, area_ratio=1.5)
  np.testing.assert_array_equal(flags, [False, True, False, False, True, False])
  # Containment is a fraction of the smaller mask: D has 4 / 20 = 0.2 of its pixels in A.
  np.testing.assert_array_equal(amg.part_flags(masks, levels, (0, 1), 0.2, 1.5)[3], True)
  assert not amg.part_flags(masks, levels, (), 0.9, 1.5).any()
  assert amg.part_flags(np.zeros((0, 4, 4), bool), np.zeros(0, int), (0, 1), 0.9, 1.5).shape == (0,)


def test_crop_geometry_equals_sams_two_resizes():
  """rows @ logits @ colsᵀ == bilinear to S, cut to the resized crop, bilinear to the crop (torch)."""
  torch = pytest.importorskip("torch")
  low_res = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32) * 10
  for crop_h, crop_w in [(121, 150), (40, 30), (64, 64), (200, 37)]:
    geometry = sam_model.crop_geometry(crop_h, crop_w, S, 16, 256)
    resized_h, resized_w = amg.longest_side_shape(crop_h, crop_w, S)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(low_res)[None, None], (S, S), mode="bilinear",
                                                align_corners=False)[..., :resized_h, :resized_w]
    want = torch.nn.functional.interpolate(upsampled, (crop_h, crop_w), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    got = geometry.rows @ low_res @ geometry.cols.T  # [256, 256]
    np.testing.assert_allclose(got[:crop_h, :crop_w], want, atol=1e-4)
    assert not got[crop_h:].any() and not got[:, crop_w:].any()
    assert geometry.valid_rows.sum() == crop_h and geometry.valid_cols.sum() == crop_w
  with pytest.raises(ValueError, match="canvas"):
    sam_model.crop_geometry(121, 150, S, 16, 128)


@pytest.mark.slow
def test_benchmark_propose_tiny_writes_consistent_figures(tmp_path):
  from scripts import benchmark_propose
  out = tmp_path / "propose.json"
  report = benchmark_propose.main(["--out", str(out), "--models", "tiny", "--images", "2", "--points-per-side",
                                   "2", "--height", "60", "--width", "80"])
  (tiny,) = report["models"]
  assert tiny["grid_points"] == 4 and tiny["images"] == 2 and tiny["compile_s"] > 0
  assert tiny["seconds_per_image"] == pytest.approx(tiny["steady_s"] / 2)
  assert tiny["images_per_s"] == pytest.approx(1 / tiny["seconds_per_image"])
  assert "random weights" in tiny["source"] and out.exists()
