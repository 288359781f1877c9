"""A LISA-layout checkpoint (transformers LLaMA + CLIP, segment-anything SAM) → configs/lisa.py:tiny, against a
PyTorch reference of LISA's inference (`LISAForCausalLM.evaluate`, written from LISA's model file).

The checkpoint is assembled from the real libraries with random weights, saved as two bf16 `.bin` shards with
their index, `added_tokens.json` and a SentencePiece `tokenizer.model`, exactly the layout LISA publishes. The
reference reads the same shards (upcast to float32), preprocesses the SAM input as LISA's `ResizeLongestSide` +
`Sam.preprocess`, splices the projected CLIP features at the `<image>` placeholder, decodes greedily with the KV
cache, takes the last-layer hidden state that predicted `[SEG]` through `text_hidden_fcs` as the only sparse
prompt (dense prompt `no_mask_embed`, `multimask_output=False`) and post-processes as `Sam.postprocess_masks`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("segment_anything") is None:
  pytest.skip("needs the pip package segment-anything (the torch extra)", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from configs import lisa as lisa_config  # noqa: E402
from unires_jax.convert import checkpoints  # noqa: E402
from unires_jax.convert import clip_vit as clip_convert  # noqa: E402
from unires_jax.convert import lisa as lisa_convert  # noqa: E402
from unires_jax.convert import llama as llama_convert  # noqa: E402
from unires_jax.convert import pretrained  # noqa: E402
from unires_jax.data import pipeline, tokenizer as tokenizer_lib  # noqa: E402
from unires_jax.eval import inference  # noqa: E402
from unires_jax.models.unires import UniRES, UniRESConfig  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # ≈95 s on the 2-core machine, the import fixture most of it

SAM_MEAN, SAM_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for the image in input_ids


def _segment_anything_modeling():
  """segment-anything's `modeling` subpackage alone (its package __init__ needs torchvision)."""
  folder = importlib.util.find_spec("segment_anything").submodule_search_locations[0]
  if folder not in sys.path:
    sys.path.insert(0, folder)
  import modeling  # noqa: PLC0415
  return modeling


def _randomise(module, generator):
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      # Norm scales near 1, everything else small: a random but well-conditioned network.
      param.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)


def _build_modules(config, seed=0):
  """(LlamaForCausalLM, CLIPVisionModel, mm_projector, segment-anything Sam, text_hidden_fcs) of configs/lisa.py:tiny."""
  modeling = _segment_anything_modeling()
  cfg = UniRESConfig.from_config(config.model)
  generator = torch.Generator().manual_seed(seed)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_convert.llama_config_to_hf(cfg.llm))).eval()
  clip = transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**clip_convert.clip_vit_config_to_hf(cfg.vit))).eval()
  projector = torch.nn.Linear(cfg.vit.width, cfg.llm.hidden_size)
  sv, md = cfg.sam_vit, cfg.mask_decoder
  grid = sv.image_size // sv.patch_size
  sam = modeling.Sam(
      image_encoder=modeling.ImageEncoderViT(
          img_size=sv.image_size, patch_size=sv.patch_size, embed_dim=sv.width, depth=sv.depth,
          num_heads=sv.num_heads, mlp_ratio=sv.mlp_dim / sv.width, out_chans=sv.out_channels, qkv_bias=True,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=sv.window_size,
          global_attn_indexes=sv.global_attn_indexes),
      prompt_encoder=modeling.PromptEncoder(embed_dim=md.transformer_dim, image_embedding_size=(grid, grid),
                                            input_image_size=(sv.image_size, sv.image_size), mask_in_chans=16),
      mask_decoder=modeling.MaskDecoder(
          num_multimask_outputs=md.num_multimask_outputs, transformer_dim=md.transformer_dim,
          transformer=modeling.TwoWayTransformer(depth=md.depth, embedding_dim=md.transformer_dim,
                                                 mlp_dim=md.mlp_dim, num_heads=md.num_heads),
          iou_head_depth=md.iou_head_depth, iou_head_hidden_dim=md.iou_head_hidden_dim),
      pixel_mean=SAM_MEAN, pixel_std=SAM_STD).eval()
  text_fcs = torch.nn.Sequential(torch.nn.Linear(cfg.llm.hidden_size, cfg.llm.hidden_size), torch.nn.ReLU(),
                                 torch.nn.Linear(cfg.llm.hidden_size, md.transformer_dim), torch.nn.Dropout(0.0))
  for module in (llama, clip, projector, sam, text_fcs):
    _randomise(module, generator)
  return llama, clip, projector, sam, text_fcs


def _lisa_state_dict(llama, projector, sam, text_fcs):
  state = dict(llama.state_dict())
  state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
  state.update({f"model.visual_model.{k}": v for k, v in sam.state_dict().items()})
  state.update({f"model.text_hidden_fcs.0.{k}": v for k, v in text_fcs.state_dict().items()})
  return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}


def _write_tokenizer(directory, llm_vocab_size):
  sentences = ["the red house on the left", "What is the cat in this image? Please output segmentation mask.",
               "A chat between a curious human and an artificial intelligence assistant.", "USER: ASSISTANT: It is"]
  prefix = os.path.join(directory, "tokenizer")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 4), model_prefix=prefix, vocab_size=300,
                                 model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 hard_vocab_limit=False, num_threads=1, minloglevel=2)
  base = spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()
  added = {"<im_patch>": base, "<im_start>": base + 1, "<im_end>": base + 2, "[SEG]": base + 3}
  assert base + 4 <= llm_vocab_size
  with open(os.path.join(directory, "added_tokens.json"), "w") as f:
    json.dump(added, f)
  return added


def _write_lisa_folder(directory, state):
  """Two `.bin` shards + `pytorch_model.bin.index.json`, as LISA's Hugging Face folders."""
  names = sorted(state)
  shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
  weight_map = {}
  for shard, shard_names in shards.items():
    torch.save({n: state[n] for n in shard_names}, os.path.join(directory, shard))
    weight_map.update({n: shard for n in shard_names})
  with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def lisa(tmp_path_factory):
  root = tmp_path_factory.mktemp("lisa")
  config = lisa_config.get_config("tiny")
  llama, clip, projector, sam, text_fcs = _build_modules(config)
  lisa_dir, clip_dir = root / "LISA-tiny", root / "clip"
  lisa_dir.mkdir()
  added = _write_tokenizer(str(lisa_dir), config.model.llm.vocab_size)
  seg_id = added["[SEG]"]
  # Random weights rarely emit [SEG]: point its lm_head row at the hidden state that predicts the second answer
  # token of the test prompt, so the answer holds [SEG] after at least one KV-cache step.
  config.data.tokenizer_path = str(lisa_dir / "tokenizer.model")
  tokenizer = tokenizer_lib.Tokenizer(config.data.tokenizer_path)
  batch = inference.make_prompt_batch(config, tokenizer, [_image(0)], [PHRASE])
  before, after, clip_pixels = _reference_inputs(batch)
  hidden = lisa_evaluate((llama, clip, projector, sam, text_fcs), clip_pixels, _image(0), before, after, seg_id,
                         tokenizer.eos_id, 2)["hidden"][1][0]
  with torch.no_grad():
    llama.lm_head.weight[seg_id] = 40.0 * hidden / hidden.square().sum()
  config.data.tokenizer_path = ""
  state = _lisa_state_dict(llama, projector, sam, text_fcs)
  _write_lisa_folder(str(lisa_dir), state)
  # openai/clip-vit-large-patch14 is a full CLIPModel: its vision tensors are named `vision_model.*`.
  clip_dir.mkdir()
  save_file({(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.contiguous()
             for k, v in clip.state_dict().items()}, str(clip_dir / "model.safetensors"))
  out = root / "imported"
  report = pretrained.import_pretrained(config, str(out), {"lisa": str(lisa_dir), "vision_tower": str(clip_dir)})
  # The reference reads the same bf16 tensors, upcast.
  reference = {k: v.float() for k, v in state.items()}
  llama.load_state_dict({k: v for k, v in reference.items() if not k.startswith(("model.mm_", "model.visual",
                                                                                 "model.text_hidden"))})
  projector.load_state_dict({k[len("model.mm_projector."):]: v for k, v in reference.items()
                             if k.startswith("model.mm_projector.")})
  sam.load_state_dict({k[len("model.visual_model."):]: v for k, v in reference.items()
                       if k.startswith("model.visual_model.")})
  text_fcs.load_state_dict({k[len("model.text_hidden_fcs.0."):]: v for k, v in reference.items()
                            if k.startswith("model.text_hidden_fcs.0.")})
  return dict(config=config, out=str(out), report=report, lisa_dir=str(lisa_dir), clip_dir=str(clip_dir),
              modules=(llama, clip, projector, sam, text_fcs), seg_id=seg_id, added=added)


# ------------------------------------------------------------------------------------- LISA's inference in torch


def _sam_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
  """LISA's ResizeLongestSide.apply_image + Sam.preprocess: [1, 3, size, size] and the resized (h, w)."""
  h, w = image.shape[:2]
  scale = size / max(h, w)
  new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
  resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
  x = torch.from_numpy(resized).permute(2, 0, 1).float()
  x = (x - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[:, None, None]
  return F.pad(x, (0, size - new_w, 0, size - new_h))[None], (new_h, new_w)


@torch.no_grad()
def lisa_evaluate(modules, clip_pixels, image, ids_before, ids_after, seg_id, eos_id, max_new_tokens):
  """LISA's evaluate() for one image: greedy tokens, [SEG] hidden, low-res and original-size mask logits."""
  llama, clip, projector, sam, text_fcs = modules
  features = clip(clip_pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # [1, Ni, Dv]
  embed = llama.model.embed_tokens
  embeds = torch.cat([embed(torch.tensor([ids_before])), projector(features), embed(torch.tensor([ids_after]))], 1)
  out = llama.model(inputs_embeds=embeds, use_cache=True)
  cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]  # [1, D], after the final norm
  tokens, seg_hidden, hiddens = [], None, []
  for _ in range(max_new_tokens):
    hiddens.append(hidden)
    token = int(llama.lm_head(hidden).argmax(-1))
    tokens.append(token)
    if token == seg_id and seg_hidden is None:
      seg_hidden = hidden  # the hidden state that predicted [SEG]
    if token == eos_id:
      break
    out = llama.model(inputs_embeds=embed(torch.tensor([[token]])), past_key_values=cache, use_cache=True)
    cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
  result = {"tokens": tokens, "seg_hidden": seg_hidden, "hidden": hiddens}
  if seg_hidden is None:
    return result
  size = sam.image_encoder.img_size
  pixels, (new_h, new_w) = _sam_input(image, size)
  image_embeddings = sam.image_encoder(pixels)
  sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
  sparse = torch.cat([sparse, text_fcs(seg_hidden)[:, None]], dim=1)  # LISA's text_embeds: the only prompt
  low_res, _ = sam.mask_decoder(image_embeddings=image_embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)
  canvas = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
  original = F.interpolate(canvas[..., :new_h, :new_w], image.shape[:2], mode="bilinear", align_corners=False)
  result.update(canvas_logits=canvas[0, 0].numpy(), mask=original[0, 0].numpy() > 0)
  return result


# ------------------------------------------------------------------------------------------------------ tests


def test_import_maps_every_lisa_tensor_and_initialises_nothing(lisa):
  report = lisa["report"]
  assert report["num_initialised_tensors"] == 0, report["initialised"]
  sources = {row["source"].split()[0] for row in report["imported"]}
  assert sources == {"lisa", "vision_tower"}
  tokenizer = tokenizer_lib.Tokenizer(os.path.join(lisa["out"], "tokenizer", "tokenizer.model"))
  assert tokenizer.special_ids[tokenizer_lib.SEG_TOKEN] == lisa["added"]["[SEG]"]
  assert tokenizer.special_ids[tokenizer_lib.IMAGE_TOKEN] == lisa["added"]["<im_patch>"]
  with pytest.raises(KeyError, match="<obj>"):
    tokenizer.special_ids[tokenizer_lib.OBJECT_TOKEN]
  params, config = checkpoints.load_params(lisa["out"])
  assert config.data.tokenizer_path.endswith(os.path.join("tokenizer", "tokenizer.model"))
  sam = lisa["modules"][3]
  np.testing.assert_array_equal(  # fused qkv [3D, D] → [D, 3, H, Dh], bf16 → float32 exactly
      params["sam_vit"]["layers_1"]["attn"]["qkv_kernel"].reshape(32, -1).T,
      sam.image_encoder.blocks[1].attn.qkv.weight.detach().numpy())
  assert "vision_high" not in params and "dynamic_query" not in params


def test_mismatch_and_missing_shard_are_named(lisa, tmp_path):
  config = lisa_config.get_config("tiny")
  config.model.mask_decoder.mlp_dim = 48
  with pytest.raises(ValueError, match=r"mask_decoder\.transformer\.layers\.0\.mlp\.lin1\.weight"):
    pretrained.import_pretrained(config, str(tmp_path / "a"), {"lisa": lisa["lisa_dir"]})
  broken = tmp_path / "broken"
  broken.mkdir()
  with open(os.path.join(lisa["lisa_dir"], "pytorch_model.bin.index.json")) as f:
    index = json.load(f)
  (broken / "pytorch_model.bin.index.json").write_text(json.dumps(index))
  with pytest.raises(FileNotFoundError, match="pytorch_model-00001-of-00002.bin"):
    lisa_convert.IndexedReader(str(broken))
  with pytest.raises(ValueError, match="dense_source"):
    lisa_convert.lisa_table(UniRESConfig.from_config(dict(config.model.to_dict(), dense_source="convnext")))


def _jax_side(lisa, image, phrase, max_new_tokens):
  params, run_config = checkpoints.load_params(lisa["out"])
  model = UniRES(UniRESConfig.from_config(run_config.model))
  tokenizer = tokenizer_lib.Tokenizer(run_config.data.tokenizer_path)
  batch = inference.make_prompt_batch(run_config, tokenizer, [image], [phrase])
  generate = jax.jit(inference.make_generate_fn(model, lisa["seg_id"], tokenizer.eos_id, tokenizer.pad_id,
                                                max_new_tokens=max_new_tokens))
  outputs = jax.device_get(generate(params, {k: jnp.asarray(v) for k, v in batch.items()}))
  return model, params, tokenizer, batch, outputs


def _seg_hidden_jax(model, params, batch, answer_ids, seg_id):
  """The teacher-forced last-layer hidden state at the position predicting the first [SEG] of `answer_ids`."""
  prompt_len = int(batch["attention_mask"][0].sum())
  ids = np.array(batch["input_ids"])
  ids[0, prompt_len:prompt_len + len(answer_ids)] = answer_ids
  mask = np.zeros_like(batch["attention_mask"])
  mask[0, :prompt_len + len(answer_ids)] = True
  full = dict(batch, input_ids=ids, attention_mask=mask)

  def hidden_of(module, b):
    vision = module.encode_vision(b)
    embeds, m = module.embed_sequence(b["input_ids"], b["token_type"], b["attention_mask"], vision,
                                      b["object_box_mask"], b["part_box_mask"])
    return module.run_llm(embeds, m)

  hidden = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in full.items()}, method=hidden_of)
  return np.asarray(hidden[0, prompt_len - 1 + answer_ids.index(seg_id)])


def _reference_inputs(batch):
  """The prompt as LISA holds it: ids before and after the `<image>` placeholder, and the CLIP pixels."""
  prompt_len = int(batch["attention_mask"][0].sum())
  ids = batch["input_ids"][0, :prompt_len].tolist()
  types = batch["token_type"][0, :prompt_len]
  slots = np.flatnonzero(types == pipeline.IMAGE_SLOT)
  before, after = ids[:slots[0]], ids[slots[-1] + 1:]
  clip_pixels = torch.from_numpy(np.asarray(batch["image_low"])).permute(0, 3, 1, 2)
  return before, after, clip_pixels


PHRASE = "the red house on the left"


def _image(seed, height=96, width=80):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
  image[20:60, 10:50] = [200, 30, 30]
  return image


def test_generation_seg_hidden_and_mask_match_lisa_reference(lisa):
  image, phrase = _image(0), PHRASE
  seg_id = lisa["seg_id"]
  model, params, tokenizer, batch, outputs = _jax_side(lisa, image, phrase, max_new_tokens=4)
  before, after, clip_pixels = _reference_inputs(batch)
  assert before[0] == tokenizer.bos_id and after[0] == lisa["added"]["<im_end>"]
  assert before[-1] == lisa["added"]["<im_start>"]
  reference = lisa_evaluate(lisa["modules"], clip_pixels, image, before, after, seg_id, tokenizer.eos_id, 4)
  jax_tokens = [int(t) for t in outputs["tokens"][0]]
  cut = jax_tokens.index(tokenizer.eos_id) + 1 if tokenizer.eos_id in jax_tokens else len(jax_tokens)
  assert jax_tokens[:cut] == reference["tokens"]
  assert bool(outputs["has_seg"][0]) == (reference["seg_hidden"] is not None)
  assert reference["seg_hidden"] is not None, f"random weights emitted no [SEG]: {reference['tokens']}"
  seg_hidden = _seg_hidden_jax(model, params, batch, reference["tokens"], seg_id)
  np.testing.assert_allclose(seg_hidden, reference["seg_hidden"][0].numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(outputs["mask_logits"][0], reference["canvas_logits"], atol=1e-3, rtol=1e-3)
  mask = inference.masks_to_original(outputs, [image.shape[:2]])[0]
  intersection = np.logical_and(mask, reference["mask"]).sum()
  union = np.logical_or(mask, reference["mask"]).sum()
  assert union > 0 and intersection / union >= 0.999, (intersection, union)
