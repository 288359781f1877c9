from __future__ import annotations

import io
import os

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from configs import common, data_common
from unires_jax import sharding
from unires_jax.data import pipeline, records, transforms
from unires_jax.data import tokenizer as tokenizer_lib

# (dtype, shape with B = batch and the tiny model's S_l = 56, S_h = 128, No = 4, Np = 8, L = 96) per DESIGN.md.
S_L, S_H, NO, NP, L = 56, 128, 4, 8, 96
BATCH_SPEC = {
    "image_low": (np.float32, (S_L, S_L, 3)), "image_high": (np.float32, (S_H, S_H, 3)),
    "object_boxes": (np.float32, (NO, 4)), "object_box_mask": (np.bool_, (NO,)),
    "part_boxes": (np.float32, (NP, 4)), "part_box_mask": (np.bool_, (NP,)),
    "input_ids": (np.int32, (L,)), "token_type": (np.int32, (L,)), "attention_mask": (np.bool_, (L,)),
    "target_ids": (np.int32, (L,)), "loss_mask": (np.float32, (L,)), "seg_index": (np.int32, ()),
    "has_target": (np.bool_, ()), "gt_mask": (np.float32, (S_H, S_H)), "sample_index": (np.int32, ()),
}
DETECTOR = "test detector"
WORDS = ("left", "right", "red", "blue", "box", "wheel", "top", "small", "big", "corner")


def _rect_mask(box, height, width) -> np.ndarray:
  x0, y0, x1, y1 = box
  mask = np.zeros((height, width), bool)
  mask[y0:y1, x0:x1] = True
  return mask


def _record(image_id, height, width, objects, parts, refs, proposals=None, dataset="synthetic"):
  """A record with rectangle annotations; `refs` are (ann_ids, granularity, sentences)."""
  rng = np.random.default_rng(image_id)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  encoded = io.BytesIO()
  Image.fromarray(pixels).save(encoded, format="PNG")
  annotations = []
  for k, (box, granularity) in enumerate([(b, "object") for b in objects] + [(b, "part") for b in parts]):
    rle = mask_utils.encode(np.asfortranarray(_rect_mask(box, height, width).astype(np.uint8)))
    annotations.append(dict(ann_id=image_id * 100 + k, category="box", granularity=granularity,
                            bbox=[float(v) for v in box], rle=dict(size=[height, width],
                                                                   counts=rle["counts"].decode("ascii"))))
  ref_list = []
  for r, (ann_ids, granularity, sentences) in enumerate(refs):
    ref_list.append(dict(ref_id=image_id * 10 + r, split="val", ann_ids=[image_id * 100 + a for a in ann_ids],
                         granularity=granularity,
                         sentences=[dict(sent_id=image_id * 100 + r * 10 + s, sent=t) for s, t in enumerate(sentences)]))
  return dict(dataset=dataset, image_id=image_id, file_name=f"{image_id}.png", height=height, width=width,
              image_bytes=encoded.getvalue(), annotations=annotations,
              proposals=proposals or records.empty_proposals(), refs=ref_list)


def _phrase(rng) -> str:
  return "the " + " ".join(rng.choice(WORDS, size=3))


def _main_records() -> list[dict]:
  """16 samples: object, multi-object, part and no-target refs; one image with more boxes than slots; one with
  detector proposals."""
  rng = np.random.default_rng(0)
  out = [
      _record(1, 48, 64, objects=[(4, 4, 30, 40), (32, 8, 60, 44)], parts=[(4, 4, 16, 20)],
              refs=[([0], "object", [_phrase(rng), _phrase(rng)]), ([0, 1], "multi-object", [_phrase(rng)]),
                    ([2], "part", [_phrase(rng)]), ([], "no-target", [_phrase(rng)])]),
      # Six objects for four slots; the referred one (index 5) is the smallest.
      _record(2, 64, 40, objects=[(0, 0, 20, 20), (0, 20, 30, 50), (20, 0, 40, 10), (2, 50, 38, 64),
                                  (22, 22, 38, 40), (30, 12, 34, 16)], parts=[],
              refs=[([5], "object", [_phrase(rng), _phrase(rng)])]),
      _record(3, 32, 32, objects=[(8, 8, 24, 24)], parts=[(8, 8, 16, 16)],
              proposals=dict(object=[[6.0, 6.0, 26.0, 26.0], [0.0, 0.0, 10.0, 10.0]], part=[[8.0, 8.0, 16.0, 17.0]],
                             object_scores=[0.9, 0.4], part_scores=[0.8], source=DETECTOR),
              refs=[([0], "object", [_phrase(rng), _phrase(rng)]), ([1], "part", [_phrase(rng)])]),
  ]
  for image_id in (4, 5):
    out.append(_record(image_id, 40, 56, objects=[(10, 5, 40, 35)], parts=[(10, 5, 20, 15)],
                       refs=[([0], "object", [_phrase(rng), _phrase(rng)]), ([1], "part", [_phrase(rng)])]))
  return out


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("splits")
  main = str(root / "main")
  records.write_split(_main_records(), main, num_shards=1, dataset="synthetic", split="val")
  rng = np.random.default_rng(1)
  # A split of no-target samples only, to count the mixture by has_target.
  empty = [_record(50 + i, 32, 48, objects=[(0, 0, 10, 10)], parts=[], refs=[([], "no-target", [_phrase(rng)])])
           for i in range(5)]
  records.write_split(empty, str(root / "empty"), num_shards=1, dataset="synthetic", split="val")
  pipeline.ensure_toy_tokenizer(_config([main], toy_tokenizer_prefix=str(root / "tok")))  # as a run would
  return dict(main=main, empty=str(root / "empty"), root=str(root))


def _config(sources, **data_overrides):
  from ml_collections import ConfigDict
  config = ConfigDict()
  config.model = common.model_config("tiny")
  config.data = data_common.data_config("toy", sources)
  config.data.toy_tokenizer_vocab_size = 400
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


@pytest.fixture(scope="module")
def eval_batches(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  tokenizer = tokenizer_lib.Tokenizer(pipeline.resolve_tokenizer(config))
  stats = pipeline.PipelineStats()
  batches = list(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=6, stats=stats))
  return config, tokenizer, batches, stats


def _samples(batches):
  """Per-sample dicts of every real (non-padding) row, keyed by sample_index."""
  out = {}
  for batch in batches:
    for row in range(batch["sample_index"].shape[0]):
      if batch["sample_index"][row] >= 0:
        out[int(batch["sample_index"][row])] = {k: v[row] for k, v in batch.items()}
  return out


def test_every_key_has_the_design_dtype_and_shape(eval_batches):
  _, _, batches, _ = eval_batches
  assert len(batches) == 3  # 16 samples in batches of 6, the last padded
  for batch in batches:
    assert sorted(batch) == sorted(BATCH_SPEC)
    for key, (dtype, shape) in BATCH_SPEC.items():
      assert batch[key].dtype == dtype, key
      assert batch[key].shape == (6,) + shape, key


def test_eval_covers_the_split_in_order_and_pads_with_minus_one(eval_batches):
  _, _, batches, stats = eval_batches
  indices = np.concatenate([b["sample_index"] for b in batches])
  np.testing.assert_array_equal(indices, list(range(16)) + [-1, -1])
  assert stats.samples == 18 and stats.too_long_samples == 0


def test_visual_slots_and_token_type_agree_with_the_special_ids(eval_batches):
  config, tokenizer, batches, _ = eval_batches
  layout = pipeline.Layout.from_config(config)
  special = tokenizer.special_ids
  prefix_ids, prefix_types = pipeline.visual_prefix(tokenizer, layout)
  assert len(prefix_ids) == 1 + 18 + 6 + 10
  for batch in batches:
    ids, types = batch["input_ids"], batch["token_type"]
    np.testing.assert_array_equal(ids[:, :len(prefix_ids)], np.broadcast_to(prefix_ids, (6, len(prefix_ids))))
    for slot, slot_type, count in (("<image>", 1, 16), ("<obj>", 2, NO), ("<part>", 3, NP)):
      np.testing.assert_array_equal(ids == special[slot], types == slot_type)
      assert np.all((types == slot_type).sum(axis=1) == count)
    assert np.all(ids[:, 0] == tokenizer.bos_id)
    assert np.all(ids[:, 1] == special["<im_start>"]) and np.all(ids[:, 18] == special["<im_end>"])
    assert np.all(ids[:, 19] == special["<obj_start>"]) and np.all(ids[:, 24] == special["<obj_end>"])
    assert np.all(ids[:, 25] == special["<part_start>"]) and np.all(ids[:, 34] == special["<part_end>"])


def test_loss_mask_covers_exactly_the_answer_and_seg_index_predicts_seg(eval_batches, split_dirs):
  config, tokenizer, batches, _ = eval_batches
  source = records.SplitSource(split_dirs["main"])
  seg_id = tokenizer.special_ids["[SEG]"]
  for index, sample in _samples(batches).items():
    ref = source.sample(index)["ref"]
    phrase = source.sample(index)["sentence"]["sent"]
    has_target = bool(ref["ann_ids"])
    answer = (config.data.answer_templates if has_target else config.data.no_target_answer_templates)[0]
    expected_answer = tokenizer.encode(answer.format(phrase=phrase)) + [tokenizer.eos_id]
    np.testing.assert_array_equal(sample["target_ids"][sample["loss_mask"] == 1], expected_answer)
    # The answer span is contiguous, ends at the last real token and is followed by padding only.
    positions = np.flatnonzero(sample["loss_mask"])
    np.testing.assert_array_equal(positions, np.arange(positions[0], positions[-1] + 1))
    used = int(sample["attention_mask"].sum() + (~sample["object_box_mask"]).sum() + (~sample["part_box_mask"]).sum())
    assert positions[-1] == used - 2 and np.all(sample["input_ids"][used:] == tokenizer.pad_id)
    np.testing.assert_array_equal(sample["target_ids"][:-1], sample["input_ids"][1:])
    question = tokenizer.encode(f"USER: {config.data.instruction_templates[0].format(phrase=phrase)} ASSISTANT:")
    np.testing.assert_array_equal(sample["input_ids"][35:35 + len(question)], question)
    assert bool(sample["has_target"]) == has_target
    if has_target:
      assert sample["target_ids"][sample["seg_index"]] == seg_id
      assert sample["loss_mask"][sample["seg_index"]] == 1
    else:
      assert sample["seg_index"] == 0 and seg_id not in sample["input_ids"]


def test_gt_mask_is_the_union_of_referred_rectangles(eval_batches, split_dirs):
  _, _, batches, _ = eval_batches
  source = records.SplitSource(split_dirs["main"])
  for index, sample in _samples(batches).items():
    found = source.sample(index)
    record, ref = found["record"], found["ref"]
    expected = np.zeros((record["height"], record["width"]), bool)
    for ann in record["annotations"]:
      if ann["ann_id"] in ref["ann_ids"]:
        expected |= _rect_mask([int(v) for v in ann["bbox"]], record["height"], record["width"])
    np.testing.assert_array_equal(sample["gt_mask"], transforms.resize_mask(expected, S_H))
    assert (sample["gt_mask"].sum() > 0) == bool(ref["ann_ids"])


def test_images_are_the_transformed_record_pixels(eval_batches, split_dirs):
  _, _, batches, _ = eval_batches
  source = records.SplitSource(split_dirs["main"])
  sample = _samples(batches)[0]
  pixels = pipeline.decode_image(source.sample(0)["record"])
  np.testing.assert_array_equal(sample["image_low"], transforms.preprocess_image(pixels, S_L))
  np.testing.assert_array_equal(sample["image_high"], transforms.preprocess_image(pixels, S_H))


def test_annotation_boxes_on_the_high_res_canvas(eval_batches, split_dirs):
  config, _, batches, stats = eval_batches
  assert config.data.box_source == "annotations"
  assert pipeline.box_source_of(split_dirs["main"], config.data) == records.GT_BOXES_SOURCE
  assert pipeline.uses_ground_truth_boxes(pipeline.box_source_of(split_dirs["main"], config.data))
  samples = _samples(batches)
  # Sample 0: image 1 (48x64): its GT boxes scaled by 128/64 = 2.
  np.testing.assert_allclose(samples[0]["object_boxes"][:2], [[8, 8, 60, 80], [64, 16, 120, 88]])
  np.testing.assert_array_equal(samples[0]["object_box_mask"], [True, True, False, False])
  np.testing.assert_allclose(samples[0]["part_boxes"][0], [8, 8, 32, 40])
  assert samples[0]["part_box_mask"].sum() == 1 and np.all(samples[0]["part_boxes"][1:] == 0)
  # Padded boxes' slots are masked out of attention, real slots attend.
  obj_slots = samples[0]["token_type"] == 2
  np.testing.assert_array_equal(samples[0]["attention_mask"][obj_slots], [True, True, False, False])
  # Image 2 (64x40) has six objects for four slots: eval keeps the four largest, in area order.
  np.testing.assert_allclose(samples[5]["object_boxes"], np.array(
      [[0, 20, 30, 50], [2, 50, 38, 64], [0, 0, 20, 20], [22, 22, 38, 40]]) * 2.0)
  assert stats.dropped_object_boxes == 2 * 2  # two boxes dropped in each of image 2's two samples
  # Image 3 (32x32, scale 4) has detector proposals, which 'annotations' ignores.
  np.testing.assert_allclose(samples[7]["object_boxes"][:1], [[32, 32, 96, 96]])
  np.testing.assert_array_equal(samples[7]["object_box_mask"], [True, False, False, False])


def test_resolve_tokenizer_only_looks_up_and_ensure_toy_tokenizer_trains_it_once(split_dirs, tmp_path):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=str(tmp_path / "fresh"))
  expected = str(tmp_path / "fresh.model")
  with pytest.raises(FileNotFoundError, match="ensure_toy_tokenizer") as raised:
    pipeline.resolve_tokenizer(config)
  assert expected in str(raised.value) and not list(tmp_path.iterdir())  # a lookup creates nothing
  assert pipeline.ensure_toy_tokenizer(config) == expected
  made = os.stat(expected).st_mtime_ns
  assert pipeline.ensure_toy_tokenizer(config) == expected and os.stat(expected).st_mtime_ns == made  # once
  assert pipeline.resolve_tokenizer(config) == expected
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.model", "fresh.vocab"]  # no temporary left
  config.data.tokenizer_path = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    pipeline.resolve_tokenizer(config)


def test_proposal_boxes_come_from_the_records_and_none_gives_no_boxes(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok", box_source="proposals")
  samples = _samples(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=8))
  # Image 3 (32x32, scale 4): its detector proposals replace the GT boxes.
  np.testing.assert_allclose(samples[7]["object_boxes"][:2], [[24, 24, 104, 104], [0, 0, 40, 40]])
  np.testing.assert_array_equal(samples[7]["object_box_mask"], [True, True, False, False])
  np.testing.assert_allclose(samples[7]["part_boxes"][0], [32, 32, 64, 68])
  # Image 1 has no proposals: no boxes at all (ground truth never stands in).
  assert not samples[0]["object_box_mask"].any() and not samples[0]["part_box_mask"].any()
  assert not (samples[0]["attention_mask"] & (samples[0]["token_type"] == 2)).any()
  # Four of the five images have no proposals: the index counts images per source.
  assert pipeline.box_source_of(split_dirs["main"], config.data) == (
      f"{records.NO_BOXES_SOURCE} on 4 images + {DETECTOR} on 1 images")
  assert pipeline.box_source_of(split_dirs["empty"], config.data) == records.NO_BOXES_SOURCE
  config.data.box_source = "none"
  assert pipeline.box_source_of(split_dirs["main"], config.data) == records.NO_BOXES_SOURCE
  for sample in _samples(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=8)).values():
    assert not sample["object_box_mask"].any() and not sample["part_box_mask"].any()
    assert np.all(sample["object_boxes"] == 0) and np.all(sample["part_boxes"] == 0)


def test_select_boxes_keeps_targets_first_then_larger_areas():
  boxes = np.array([[0, 0, 2, 2], [0, 0, 5, 5], [0, 0, 1, 1], [0, 0, 3, 3], [0, 0, 5, 5]], np.float32)
  kept, dropped = pipeline.select_boxes(boxes, np.array([False, False, True, False, False]), 3)
  np.testing.assert_array_equal(kept, boxes[[2, 1, 4]])
  assert dropped == 2
  kept, dropped = pipeline.select_boxes(boxes[:2], np.zeros(2, bool), 3)
  np.testing.assert_array_equal(kept, boxes[:2])
  assert dropped == 0


def test_training_keeps_the_referred_box_when_truncating(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok", batch_size=16)
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  source = records.SplitSource(split_dirs["main"])
  targeted_small = [int(i) for i in batch["sample_index"] if source.sample(int(i))["ids"]["ref_id"] == 20]
  assert len(targeted_small) == 2
  for row in np.flatnonzero(np.isin(batch["sample_index"], targeted_small)):
    np.testing.assert_allclose(batch["object_boxes"][row][0], np.array([30, 12, 34, 16]) * 2.0)


def test_the_decision_weight_lands_on_the_first_answer_position_in_training_only(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  plain = _take(pipeline.make_train_iterator(config, 0, 1), 2)
  config.data.answer_decision_weight = 4.0
  weighted = _take(pipeline.make_train_iterator(config, 0, 1), 2)
  for a, b in zip(plain, weighted):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    for row in range(a["loss_mask"].shape[0]):
      answer = np.flatnonzero(a["loss_mask"][row])
      expected = a["loss_mask"][row].copy()
      expected[answer[0]] = 4.0  # the position whose next token is the answer's first ("Sure" / "Sorry" ...)
      np.testing.assert_array_equal(b["loss_mask"][row], expected)
  # Evaluation batches never carry it.
  evaluated = next(iter(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=4)))
  assert set(np.unique(evaluated["loss_mask"])) <= {0.0, 1.0}
  config.data.answer_decision_weight = 0.0
  with pytest.raises(ValueError, match="data.answer_decision_weight must be > 0"):
    pipeline.make_train_iterator(config, 0, 1)


def test_no_target_answers_scale_the_decision_weight(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  config.data.answer_decision_weight = 4.0
  config.data.no_target_decision_scale = 3.0
  batches = _take(pipeline.make_train_iterator(config, 0, 1), 4)
  kinds = set()
  for batch in batches:
    for row in range(batch["loss_mask"].shape[0]):
      answer = np.flatnonzero(batch["loss_mask"][row])
      if not answer.size:
        continue
      kinds.add(bool(batch["has_target"][row]))
      assert batch["loss_mask"][row][answer[0]] == (4.0 if batch["has_target"][row] else 12.0)
      assert set(batch["loss_mask"][row][answer[1:]]) == {1.0}
  assert kinds == {True, False}, "the batches need targeted and no-target samples"
  config.data.no_target_decision_scale = 0.0
  with pytest.raises(ValueError, match="data.no_target_decision_scale must be > 0"):
    pipeline.make_train_iterator(config, 0, 1)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_iterator_is_deterministic_for_a_seed(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  first = _take(pipeline.make_train_iterator(config, 0, 1), 3)
  _assert_same_batches(first, _take(pipeline.make_train_iterator(config, 0, 1), 3))
  config.data.seed = 1
  other = _take(pipeline.make_train_iterator(config, 0, 1), 3)
  assert not all(np.array_equal(a["sample_index"], b["sample_index"]) for a, b in zip(first, other))
  # An epoch (two batches of 8) is a permutation of the split's 16 samples, not its table order.
  epoch = np.concatenate([b["sample_index"] for b in first[:2]])
  assert sorted(epoch) == list(range(16)) and list(epoch) != list(range(16))


def test_restoring_the_iterator_state_mid_epoch_resumes_exactly(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  uninterrupted = pipeline.make_train_iterator(config, 0, 1)
  _take(uninterrupted, 1)
  state = uninterrupted.get_state()
  expected = _take(uninterrupted, 3)  # crosses the epoch boundary (two batches per epoch)
  restored = pipeline.make_train_iterator(config, 0, 1)
  restored.set_state(state)
  _assert_same_batches(expected, _take(restored, 3))


def test_simulated_processes_see_disjoint_shards_that_cover_the_data(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  seen = []
  for process in range(2):
    batches = _take(pipeline.make_train_iterator(config, process, 2), 2)  # 2 processes x 2 x 4 = one epoch
    assert all(b["sample_index"].shape == (4,) for b in batches)
    seen.append(np.concatenate([b["sample_index"] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(16))
  eval_seen = []
  for process in range(2):
    batches = list(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=6, process_index=process,
                                               process_count=2))
    assert len(batches) == 3 and all(b["sample_index"].shape == (3,) for b in batches)
    eval_seen.append([int(i) for b in batches for i in b["sample_index"] if i >= 0])
  assert not set(eval_seen[0]) & set(eval_seen[1])
  assert sorted(eval_seen[0] + eval_seen[1]) == list(range(16))


def test_training_noise_is_seeded_keeps_templates_and_never_reaches_eval(split_dirs, eval_batches):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  clean = _take(pipeline.make_train_iterator(config, 0, 1), 2)
  config.data.proposal_noise.enabled = True
  config.data.proposal_noise.false_positives = 2.0
  noisy = _take(pipeline.make_train_iterator(config, 0, 1), 2)
  _assert_same_batches(noisy, _take(pipeline.make_train_iterator(config, 0, 1), 2))  # same seed, same boxes
  changed = 0
  for a, b in zip(clean, noisy):
    for key in ("sample_index", "input_ids", "token_type", "target_ids", "loss_mask", "gt_mask", "image_high"):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # the noise draws after the template choice
    for kind, slot_type in (("object", 2), ("part", 3)):
      changed += int(not np.array_equal(a[f"{kind}_boxes"], b[f"{kind}_boxes"]))
      slots = b["token_type"] == slot_type
      np.testing.assert_array_equal(b["attention_mask"][slots].reshape(b[f"{kind}_box_mask"].shape),
                                    b[f"{kind}_box_mask"])
      real = b[f"{kind}_boxes"][b[f"{kind}_box_mask"]]
      assert np.all(real >= 0) and np.all(real <= S_H) and np.all(real[:, 2:] > real[:, :2])
  assert changed == 4
  config.data.proposal_noise.seed = 1
  reseeded = _take(pipeline.make_train_iterator(config, 0, 1), 1)[0]
  assert not np.array_equal(reseeded["object_boxes"], noisy[0]["object_boxes"])
  _, _, clean_eval, _ = eval_batches
  _assert_same_batches(clean_eval, list(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=6)))


def test_mixture_honours_its_weights(split_dirs):
  config = _config([(split_dirs["main"], 3.0), (split_dirs["empty"], 1.0)],
                   toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  batches = _take(pipeline.make_train_iterator(config, 0, 1), 12)
  # The main split is 15/16 targeted, the other all no-target: P(has_target) = 0.75 * 15/16.
  has_target = np.concatenate([b["has_target"] for b in batches])
  # Only the other split's 32x48 images leave canvas row 88 as zero padding (theirs end at row 85).
  from_empty_split = np.concatenate([np.all(b["image_high"][:, 88] == 0, axis=(1, 2)) for b in batches])
  assert abs(from_empty_split.mean() - 0.25) <= 0.03
  assert abs(has_target.mean() - 0.75 * 15 / 16) <= 0.08


def test_too_long_samples_raise_or_become_counted_inert_samples(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok", max_text_len=40)
  with pytest.raises(ValueError, match="max_text_len = 40"):
    next(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=4))
  config.data.too_long = "skip"
  stats = pipeline.PipelineStats()
  batch = next(pipeline.make_eval_iterator(config, split_dirs["main"], batch_size=4, stats=stats))
  assert stats.too_long_samples == 4
  np.testing.assert_array_equal(batch["sample_index"], [-1] * 4)
  assert np.all(batch["loss_mask"] == 0) and not batch["has_target"].any() and np.all(batch["gt_mask"] == 0)
  assert np.all(batch["attention_mask"][:, :35].sum(axis=1) > 0) and batch["input_ids"].shape == (4, 40)


def test_config_errors_name_the_key(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok", max_text_len=200)
  with pytest.raises(ValueError, match="max_seq_len 128"):
    pipeline.make_eval_iterator(config, split_dirs["main"])
  for box_source in ("detector", "auto"):
    config = _config([split_dirs["main"]], box_source=box_source)
    with pytest.raises(ValueError, match=f"box_source '{box_source}'"):
      pipeline.make_train_iterator(config, 0, 1)
  config = _config([split_dirs["main"]])
  config.data.proposal_noise.drop_target_prob = 1.5
  with pytest.raises(ValueError, match=r"data.proposal_noise.drop_target_prob must be a probability"):
    pipeline.make_train_iterator(config, 0, 1)
  config = _config([split_dirs["main"]])
  config.data.answer_templates = ["Sure."]
  with pytest.raises(ValueError, match=r"must contain \[SEG\]"):
    pipeline.make_train_iterator(config, 0, 1)
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok")
  config.model.llm.vocab_size = 200
  with pytest.raises(ValueError, match="model.llm.vocab_size is 200"):
    pipeline.make_train_iterator(config, 0, 1)


def test_to_global_batch_reassembles_the_local_batch_on_a_2x4_mesh(eval_batches):
  _, _, batches, _ = eval_batches
  local = {k: np.concatenate([batches[0][k], batches[1][k][:2]]) for k in batches[0]}  # 8 rows
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  global_batch = pipeline.to_global_batch(local, mesh)
  assert sorted(global_batch) == sorted(local)
  for key, value in global_batch.items():
    assert isinstance(value, jax.Array) and value.shape == local[key].shape and value.dtype == local[key].dtype
    assert value.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(value), local[key])
    # Each device holds its own row: device k of the flattened (data, fsdp) grid has row k.
    for shard in value.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_checkpointable(split_dirs):
  config = _config([split_dirs["main"]], toy_tokenizer_prefix=split_dirs["root"] + "/tok", worker_count=2)
  iterator = pipeline.make_train_iterator(config, 0, 1)
  first = _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  iterator.close()
  again = pipeline.make_train_iterator(config, 0, 1)
  _assert_same_batches(first, _take(again, 2))
  again.set_state(state)
  _assert_same_batches(expected, _take(again, 2))
  again.close()
