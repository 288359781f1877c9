"""The demo without a browser: upload and phrase checks, the prompt budget, the implied granularity, the overlay,
the examples, and the page's handlers around a recording model (errors become messages, never exceptions)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import configs.toy as toy_config
from unires_jax.data import pipeline, records, synthetic
from unires_jax.data import datasets
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.demo import answer, examples, inputs, session
from unires_jax.demo.app import DemoPage
from unires_jax.eval import inference
from unires_jax.proposals import ImageProposals, empty_proposals


def _save(tmp_path, name: str, pixels: np.ndarray) -> str:
  path = str(tmp_path / name)
  Image.fromarray(pixels).save(path)
  return path


# ------------------------------------------------------------------------------------------------ uploads


def test_upload_small_image_is_read_unchanged(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  image = inputs.load_upload(_save(tmp_path, "small.png", pixels))
  np.testing.assert_array_equal(image.pixels, pixels)
  assert image.original_size == (30, 50) and image.note == ""


def test_upload_huge_image_is_downscaled_with_a_note(tmp_path):
  pixels = np.random.default_rng(1).integers(0, 256, (150, 3000, 3), dtype=np.uint8)
  path = _save(tmp_path, "wide.png", pixels)
  image = inputs.load_upload(path, max_side=2048)
  assert image.pixels.shape == (102, 2048, 3) and image.original_size == (150, 3000)
  expected = np.asarray(Image.fromarray(pixels).resize((2048, 102), Image.BILINEAR))
  np.testing.assert_array_equal(image.pixels, expected)
  assert "3000×150" in image.note and "2048×102" in image.note and "downscaled" in image.note


def test_upload_grey_and_alpha_images_become_rgb(tmp_path):
  grey = inputs.load_upload(_save(tmp_path, "grey.png", np.full((4, 6), 77, np.uint8)))
  np.testing.assert_array_equal(grey.pixels, np.full((4, 6, 3), 77, np.uint8))
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, 255
  np.testing.assert_array_equal(inputs.load_upload(_save(tmp_path, "alpha.png", rgba)).pixels[..., 0], 200)


@pytest.mark.parametrize("content", [b"not an image at all\n", b"\x89PNG\r\n\x1a\n truncated", b""])
def test_upload_that_is_not_an_image_is_a_message_naming_the_file(tmp_path, content):
  path = tmp_path / "notes.txt"
  path.write_bytes(content)
  with pytest.raises(inputs.DemoInputError, match="'notes.txt' is not an image"):
    inputs.load_upload(str(path))
  with pytest.raises(inputs.DemoInputError, match="No image"):
    inputs.load_upload(None)


def test_phrase_must_hold_text():
  assert inputs.check_phrase("  the red house \n") == "the red house"
  for phrase in ("", "   \t\n", None):
    with pytest.raises(inputs.DemoInputError, match="No phrase"):
      inputs.check_phrase(phrase)


# ------------------------------------------------------------------------------------------ prompt budget


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
  """The toy run's prompt budget with a toy tokenizer trained on a small synthetic set."""
  root = tmp_path_factory.mktemp("budget")
  data_dir = synthetic.ensure_synthetic(str(root / "synthetic"), num_images=4)
  split_dir = str(root / "prepared")
  records.write_split(datasets.DATASETS.lookup("synthetic_cris")(data_dir, "train"), split_dir, num_shards=1)
  config = toy_config.get_config("quick")
  config.data.sources = [dict(dir=split_dir, weight=1.0)]
  config.data.toy_tokenizer_prefix = str(root / "toy_tokenizer")
  return session.PromptBudget.from_config(config, tokenizer_lib.Tokenizer(pipeline.ensure_toy_tokenizer(config)))


def test_short_phrase_fits_unchanged(budget):
  fitted = budget.fit("  the roof of the green house ")
  assert fitted == session.FittedPhrase("the roof of the green house")
  assert budget.prompt_length(fitted.text) <= budget.layout.max_text_len


def test_long_phrase_is_cut_to_the_longest_fitting_whole_words(budget):
  words = ("the roof of the green house on the left next to the yellow robot " * 12).split()
  phrase = " ".join(words)
  fitted = budget.fit(phrase)
  limit = budget.layout.max_text_len
  assert budget.prompt_length(phrase) > limit
  kept = fitted.text.split()
  assert kept == words[:len(kept)] and 0 < len(kept) < len(words)
  assert budget.prompt_length(fitted.text) <= limit
  assert budget.prompt_length(" ".join(words[:len(kept) + 1])) > limit  # one word more would not fit
  assert f"{limit} prompt tokens" in fitted.note and f"from {len(words)} to {len(kept)} words" in fitted.note
  assert repr(fitted.text) in fitted.note


def test_prompt_length_is_the_prompt_that_inference_builds(budget):
  ids, _ = pipeline.prompt_ids(budget.tokenizer, budget.layout, budget.instruction.format(phrase="the tree"))
  assert budget.prompt_length(" the tree ") == len(ids)


# ------------------------------------------------------------------------------------- what the page shows


def _box_mask(shape, *boxes) -> np.ndarray:
  mask = np.zeros(shape, bool)
  for x0, y0, x1, y1 in boxes:
    mask[y0:y1, x0:x1] = True
  return mask


def _proposals(objects=(), parts=()) -> ImageProposals:
  objects, parts = np.asarray(objects, np.float32).reshape(-1, 4), np.asarray(parts, np.float32).reshape(-1, 4)
  return ImageProposals(objects, parts, np.ones(len(objects), np.float32), np.ones(len(parts), np.float32))


def test_implied_granularity_from_the_answer_and_mask():
  shape = (40, 60)
  empty = _proposals()
  assert answer.implied_granularity(False, _box_mask(shape, (0, 0, 10, 10)), empty).startswith("no-target")
  assert answer.implied_granularity(True, np.zeros(shape, bool), empty).startswith("no-target")
  two = _box_mask(shape, (0, 0, 10, 10), (30, 5, 45, 20))
  assert answer.implied_granularity(True, two, empty) == "multi-object (the mask has 2 separate regions)"
  # A speck below MIN_REGION_FRACTION of the largest region is not a second object.
  speck = _box_mask(shape, (0, 0, 20, 20), (50, 30, 51, 31))
  assert answer.implied_granularity(True, speck, empty).startswith("object")
  one = _box_mask(shape, (10, 10, 20, 18))
  part = answer.implied_granularity(True, one, _proposals(objects=[[0, 0, 40, 40]], parts=[[10, 10, 20, 18]]))
  assert part == "part (one region, matching a part proposal at box IoU 1.00)"
  whole = answer.implied_granularity(True, one, _proposals(objects=[[10, 10, 20, 19]], parts=[[0, 0, 5, 5]]))
  assert whole == f"object (one region, matching a object proposal at box IoU {80 / 90:.2f})"
  assert answer.implied_granularity(True, one, empty) == "object (one region; no proposal box matches it)"


def test_mask_regions_are_eight_connected_and_largest_first():
  mask = _box_mask((10, 10), (0, 0, 2, 2), (2, 2, 3, 3), (5, 5, 10, 10))  # the first two touch at a corner
  regions = answer.mask_regions(mask)
  assert [int(r.sum()) for r in regions] == [25, 5]
  np.testing.assert_array_equal(regions[0] | regions[1], mask)


def test_overlay_tints_the_mask_and_outlines_proposals():
  pixels = np.full((20, 30, 3), 100, np.uint8)
  mask = _box_mask((20, 30), (2, 2, 6, 6))
  np.testing.assert_array_equal(answer.overlay_image(pixels, mask), inference.overlay(pixels, mask))
  drawn = answer.overlay_image(pixels, mask, _proposals(objects=[[10, 4, 20, 14]], parts=[[22, 1, 28, 9]]))
  np.testing.assert_array_equal(drawn[4, 10], answer.PROPOSAL_COLOURS["object"])   # top-left corner
  np.testing.assert_array_equal(drawn[13, 19], answer.PROPOSAL_COLOURS["object"])  # x1, y1 exclusive
  np.testing.assert_array_equal(drawn[8, 27], answer.PROPOSAL_COLOURS["part"])
  np.testing.assert_array_equal(drawn[8, 15], pixels[8, 15])  # inside a box: untouched
  np.testing.assert_array_equal(drawn[3, 3], inference.overlay(pixels, mask)[3, 3])


def test_small_images_are_enlarged_by_a_whole_factor_for_display():
  pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  big = answer.enlarge_for_display(pixels, min_side=9)
  assert big.shape == (6, 9, 3)
  np.testing.assert_array_equal(big[::3, ::3], pixels)
  assert answer.enlarge_for_display(pixels, min_side=2) is pixels


def test_examples_cover_every_granularity(tmp_path):
  found = examples.make_examples(str(tmp_path / "examples"), per_granularity=2)
  assert [e.granularity for e in found] == [g for g in examples.GRANULARITIES for _ in range(2)]
  for example in found:
    with Image.open(example.image) as image:
      assert image.size == (128, 96)
  no_target = [e.phrase for e in found if e.granularity == "no-target"]
  assert all(p.startswith("the ") and p.split()[1] in synthetic.COLOURS for p in no_target)
  assert examples.make_examples(str(tmp_path / "examples"), per_granularity=2) == found  # reused, same


# ------------------------------------------------------------------------------------------ the handlers


class RecordingModel:
  """Stands in for session.DemoModel: answers with a fixed mask (or raises), records what it was given."""

  def __init__(self, has_seg=True, error: Exception | None = None, max_chars: int = 1000):
    self.has_seg, self.error, self.max_chars, self.calls = has_seg, error, max_chars, []

  def describe(self) -> str:
    return "checkpoint /runs/x step 7; proposals: none (no boxes)"

  def fit_phrase(self, phrase: str) -> session.FittedPhrase:
    if len(phrase) <= self.max_chars:
      return session.FittedPhrase(phrase)
    return session.FittedPhrase(phrase[:self.max_chars], "The phrase was cut.")

  def _run_model(self, pixels, phrase) -> session.ModelOutput:
    self.calls.append((pixels.shape, phrase))
    if self.error is not None:
      raise self.error
    mask = _box_mask(pixels.shape[:2], (1, 1, 4, 3)) if self.has_seg else np.zeros(pixels.shape[:2], bool)
    return session.ModelOutput(mask, "Sure, it is [SEG]." if self.has_seg else "Sorry, no.", self.has_seg,
                               empty_proposals())


@pytest.fixture
def image_path(tmp_path):
  return _save(tmp_path, "scene.png", np.full((12, 16, 3), 50, np.uint8))


def test_segment_shows_the_mask_answer_and_how_it_was_made(tmp_path, image_path):
  page = DemoPage(RecordingModel(), str(tmp_path / "out"))
  result = page.segment(image_path, "  the red house ", draw_proposals=True)
  assert page.model.calls == [((12, 16, 3), "the red house")]
  assert result.answer == "Sure, it is [SEG]." and result.granularity.startswith("object")
  np.testing.assert_array_equal(np.asarray(Image.open(result.mask_path)), _box_mask((12, 16), (1, 1, 4, 3)) * 255)
  zoom = answer.DISPLAY_MIN_SIDE // 16
  assert result.overlay.shape == (12 * zoom, 16 * zoom, 3)
  assert "Mask of 6 pixels" in result.status and "step 7" in result.status and "No proposal boxes" in result.status
  assert result.timing.startswith("request 1: ") and "model" in result.timing


def test_segment_without_seg_says_no_such_target(tmp_path, image_path):
  result = DemoPage(RecordingModel(has_seg=False), str(tmp_path)).segment(image_path, "the purple robot")
  assert answer.NO_TARGET in result.status and result.granularity.startswith("no-target")
  assert not np.asarray(Image.open(result.mask_path)).any()


def test_bad_requests_become_messages_and_the_page_keeps_answering(tmp_path, image_path):
  model = RecordingModel()
  page = DemoPage(model, str(tmp_path))
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  for upload, phrase, expected in ((str(text), "the tree", "is not an image"), (None, "the tree", "No image"),
                                   (image_path, "   ", "No phrase")):
    result = page.segment(upload, phrase)
    assert result.status.startswith("**Error:**") and expected in result.status
    assert result.mask_path is None and result.overlay is None and "no result" in result.timing
  assert model.calls == []
  model.error = RuntimeError("device lost")
  result = page.segment(image_path, "the tree")
  assert "Internal error" in result.status and "device lost" in result.status and result.mask_path is None
  model.error = None
  assert page.segment(image_path, "the tree").timing.startswith("request 5: ")


def test_notes_for_downscaled_images_and_cut_phrases_reach_the_page(tmp_path):
  path = _save(tmp_path, "wide.png", np.zeros((10, 100, 3), np.uint8))
  page = DemoPage(RecordingModel(max_chars=5), str(tmp_path), max_image_side=50)
  result = page.segment(path, "the roof of the house")
  assert page.model.calls == [((5, 50, 3), "the r")]
  assert "downscaled to 50×5" in result.status and "The phrase was cut." in result.status
  assert page.preview(path)[1].startswith("The image (100×10 pixels) was downscaled")
  assert page.preview(str(tmp_path / "missing.png"))[1].startswith("**Error:**")


def test_a_single_word_longer_than_the_budget_is_cut_to_its_leading_characters(budget):
  word = "red" * 200
  fitted = budget.fit(word)
  assert word.startswith(fitted.text) and 0 < len(fitted.text) < len(word)
  assert budget.prompt_length(fitted.text) <= budget.layout.max_text_len
  assert f"the first {len(fitted.text)} characters of its first word" in fitted.note


def test_demo_script_arguments_are_checked(tmp_path):
  from scripts import demo as demo_script

  with pytest.raises(FileNotFoundError, match="--checkpoint .*nowhere.* does not exist"):
    demo_script.parse_args(["--checkpoint", str(tmp_path / "nowhere")])
  with pytest.raises(ValueError, match="--max_image_side must be at least 32"):
    demo_script.parse_args(["--checkpoint", str(tmp_path), "--max_image_side", "8"])
  args = demo_script.parse_args(["--checkpoint", str(tmp_path), "--port", "7999"])
  assert (args.host, args.port, args.step, args.max_image_side) == ("127.0.0.1", 7999, None, 2048)
