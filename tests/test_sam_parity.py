"""The Flax mask decoder against Hugging Face `SamModel`'s on shared random weights, and the import/export table."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from unires_jax.convert import sam  # noqa: E402
from unires_jax.models.mask_decoder import MaskDecoder, MaskDecoderConfig  # noqa: E402

pytestmark = pytest.mark.torch

DIM, GRID = 32, 4
CFG = MaskDecoderConfig(transformer_dim=DIM, depth=2, num_heads=4, mlp_dim=64, attention_downsample_rate=2,
                        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=24, layer_norm_eps=1e-6)


@pytest.fixture(scope="module")
def hf_model():
  from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig
  config = SamConfig(
      vision_config=SamVisionConfig(hidden_size=16, output_channels=DIM, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=GRID * 16, patch_size=16, window_size=2, global_attn_indexes=[0],
                                    mlp_dim=32, num_pos_feats=DIM // 2),
      prompt_encoder_config=SamPromptEncoderConfig(hidden_size=DIM, image_size=GRID * 16, patch_size=16,
                                                   mask_input_channels=8),
      mask_decoder_config=SamMaskDecoderConfig(hidden_size=DIM, mlp_dim=64, num_hidden_layers=2,
                                               num_attention_heads=4, attention_downsample_rate=2,
                                               num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=24,
                                               layer_norm_eps=1e-6))
  torch.manual_seed(0)
  model = SamModel(config).eval()
  with torch.no_grad():  # HF's init leaves biases and norms trivial; randomise everything so all weights matter.
    for param in model.parameters():
      param.normal_(0.0, 0.3)
  return model


def _hf_decode(model, image_embeddings, sparse, multimask):
  batch = image_embeddings.shape[0]
  with torch.no_grad():
    image_pe = model.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
    dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, GRID, GRID)
    masks, iou = model.mask_decoder(image_embeddings=torch.from_numpy(image_embeddings).permute(0, 3, 1, 2),
                                    image_positional_embeddings=image_pe,
                                    sparse_prompt_embeddings=torch.from_numpy(sparse)[:, None],
                                    dense_prompt_embeddings=dense, multimask_output=multimask)
  return masks[:, 0].numpy(), iou[:, 0].numpy()


@pytest.mark.parametrize("multimask", [False, True])
def test_matches_hf_mask_decoder(hf_model, multimask):
  rng = np.random.default_rng(0)
  image_embeddings = rng.normal(size=(2, GRID, GRID, DIM)).astype(np.float32)
  sparse = rng.normal(size=(2, 3, DIM)).astype(np.float32)
  want_masks, want_iou = _hf_decode(hf_model, image_embeddings, sparse, multimask)

  params = sam.import_sam_decoder(hf_model.state_dict(), CFG)
  masks, iou = jax.jit(MaskDecoder(CFG).apply, static_argnums=3)(
      {"params": params}, jnp.asarray(image_embeddings), jnp.asarray(sparse), multimask)
  assert masks.shape == want_masks.shape == (2, 3 if multimask else 1, 4 * GRID, 4 * GRID)
  assert iou.shape == want_iou.shape
  assert np.abs(want_masks).max() > 0.1  # the comparison is not between near-zero outputs
  np.testing.assert_allclose(np.asarray(masks), want_masks, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(iou), want_iou, atol=1e-4, rtol=0)


def test_round_trip_is_bit_exact(hf_model):
  state_dict = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  params = sam.import_sam_decoder(state_dict, CFG)
  exported = sam.export_sam_decoder(params, CFG)
  decoder_names = {k for k in state_dict
                   if k.startswith("mask_decoder.") or k in (sam.POSITIONAL, sam.TIED_POSITIONAL,
                                                             "prompt_encoder.no_mask_embed.weight")}
  assert set(exported) == decoder_names
  for name in decoder_names:
    np.testing.assert_array_equal(exported[name], state_dict[name], err_msg=name)
  again = sam.import_sam_decoder(exported, CFG)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # The exported tensors load into HF with only the image encoder and unused prompt embeddings left over.
  missing, unexpected = hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                                                 strict=False)
  assert not unexpected
  assert all(k.startswith(("vision_encoder.", "prompt_encoder.")) for k in missing)


def test_wrong_size_checkpoint_is_refused_naming_the_tensor(hf_model):
  state_dict = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  bad = dict(state_dict)
  bad["mask_decoder.transformer.layers.1.mlp.lin1.weight"] = np.zeros((128, DIM), np.float32)
  with pytest.raises(ValueError, match=r"mask_decoder\.transformer\.layers\.1\.mlp\.lin1\.weight"):
    sam.import_sam_decoder(bad, CFG)
  missing = {k: v for k, v in state_dict.items() if k != "mask_decoder.iou_token.weight"}
  with pytest.raises(KeyError, match=r"mask_decoder\.iou_token\.weight"):
    sam.import_sam_decoder(missing, CFG)
  with pytest.raises(KeyError, match=r"mask_decoder\.extra\.weight"):
    sam.import_sam_decoder({**state_dict, "mask_decoder.extra.weight": np.zeros(1)}, CFG)
  untied = {**state_dict, sam.TIED_POSITIONAL: state_dict[sam.POSITIONAL] + 1.0}
  with pytest.raises(ValueError, match="tied"):
    sam.import_sam_decoder(untied, CFG)


def test_bfloat16_torch_tensors_import_bit_exact(hf_model):
  """A bf16 checkpoint (LISA ships one) imports: each tensor keeps its bf16 bits (`convert/common.py`)."""
  import ml_dtypes
  import torch

  bf16 = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
  params = sam.import_sam_decoder(bf16, CFG)
  widened = sam.import_sam_decoder({k: v.float() for k, v in bf16.items()}, CFG)
  flat = jax.tree_util.tree_leaves_with_path(params)
  assert any(np.asarray(leaf).dtype == ml_dtypes.bfloat16 for _, leaf in flat)
  for (path, leaf), other in zip(flat, jax.tree_util.tree_leaves(widened)):
    np.testing.assert_array_equal(np.asarray(leaf).astype(np.float32), np.asarray(other), err_msg=str(path))
