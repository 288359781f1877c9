"""Image loading: each PIL mode against the rendering of the same picture, EXIF orientations against Pillow's
exif_transpose, annotations moved with the pixels, truncated files named."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from unires_jax.data import images

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, size=(6, 10), dtype=np.uint8)  # [h, w], the reference picture
COLOUR = RNG.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)  # [h, w, 3]


def _saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
  """A PNG file written by hand (Pillow cannot write 16-bit colour): filter byte 0 before each row."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_16_bit_grey_png_is_the_8_bit_picture_not_white():
  data = _saved(Image.fromarray((GREY.astype(np.uint16) * 257)), "PNG")
  assert Image.open(io.BytesIO(data)).mode == "I;16"
  np.testing.assert_array_equal(images.load_image(data), _grey_rgb(GREY))


def test_16_bit_colour_png_written_by_hand():
  sixteen = COLOUR.astype(">u2") * 257  # [h, w, 3] big-endian samples
  rows = b"".join(b"\x00" + sixteen[y].tobytes() for y in range(sixteen.shape[0]))
  data = _png(COLOUR.shape[1], COLOUR.shape[0], 16, 2, rows)
  np.testing.assert_array_equal(images.load_image(data), COLOUR)


def test_32_bit_integer_and_float_tiffs():
  as_int = _saved(Image.fromarray(GREY.astype(np.int32) * 257), "TIFF")
  assert Image.open(io.BytesIO(as_int)).mode == "I"
  np.testing.assert_array_equal(images.load_image(as_int), _grey_rgb(GREY))
  unit_float = _saved(Image.fromarray(GREY.astype(np.float32) / 255.0), "TIFF")
  assert Image.open(io.BytesIO(unit_float)).mode == "F"
  np.testing.assert_array_equal(images.load_image(unit_float), _grey_rgb(GREY))
  byte_float = _saved(Image.fromarray(GREY.astype(np.float32)), "TIFF")
  np.testing.assert_array_equal(images.load_image(byte_float), _grey_rgb(GREY))


def test_grey_with_alpha_is_composited_on_white():
  alpha = RNG.integers(0, 256, size=GREY.shape, dtype=np.uint8)
  data = _saved(Image.fromarray(np.stack([GREY, alpha], -1), mode="LA"), "PNG")
  a = alpha.astype(np.float64) / 255.0
  expected = _grey_rgb(np.rint(GREY * a + 255.0 * (1.0 - a)).astype(np.uint8))
  np.testing.assert_allclose(images.load_image(data).astype(int), expected.astype(int), atol=1)


def test_palette_with_a_transparent_index_shows_white_there():
  palette_image = Image.fromarray(COLOUR).quantize(colors=8)
  indices = np.asarray(palette_image)
  transparent = int(indices[0, 0])
  data = _saved(palette_image, "PNG", transparency=transparent)
  palette = np.asarray(palette_image.getpalette()[:8 * 3], np.uint8).reshape(-1, 3)
  expected = palette[indices]
  expected[indices == transparent] = 255
  np.testing.assert_array_equal(images.load_image(data), expected)


def test_cmyk_matches_pillows_own_conversion():
  cmyk = Image.fromarray(COLOUR).convert("CMYK")
  data = _saved(cmyk, "TIFF")
  np.testing.assert_array_equal(images.load_image(data), np.asarray(cmyk.convert("RGB")))
  red = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
  np.testing.assert_array_equal(images.load_image(_saved(red, "TIFF"))[0, 0], [255, 0, 0])


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA"])
def test_ordinary_modes_match_pillow(mode):
  image = Image.fromarray(COLOUR).convert(mode)
  data = _saved(image, "PNG")
  expected = np.asarray(image.convert("RGB")) if mode != "RGBA" else COLOUR  # opaque RGBA
  np.testing.assert_array_equal(images.load_image(data), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_pixels_masks_and_boxes_alike(orientation):
  exif = Image.Exif()
  exif[images.EXIF_ORIENTATION_TAG] = orientation
  data = _saved(Image.fromarray(COLOUR), "PNG", exif=exif.tobytes())
  upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
  loaded = images.load_image(data)
  np.testing.assert_array_equal(loaded, upright)
  np.testing.assert_array_equal(images.orient_mask(COLOUR, orientation), upright)
  height, width, found = images.image_info(data)
  assert (height, width, found) == (*upright.shape[:2], orientation)
  # A box and the mask it bounds on the stored pixels stay a box and its mask on the upright image.
  mask = np.zeros(COLOUR.shape[:2], bool)
  mask[1:4, 2:7] = True  # rows 1..3, columns 2..6: box (2, 1, 7, 4)
  box = images.orient_boxes(np.array([[2, 1, 7, 4]]), orientation, *COLOUR.shape[:2])[0]
  turned = images.orient_mask(mask, orientation)
  rows, columns = np.nonzero(turned)
  np.testing.assert_array_equal(box, [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1])


def test_truncated_and_non_image_files_are_named(tmp_path):
  path = tmp_path / "cut.png"
  full = _saved(Image.fromarray(RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)), "PNG")
  path.write_bytes(full[:len(full) // 2])
  with pytest.raises(images.ImageError, match=f"image '{path}' cannot be decoded"):
    images.load_image(str(path))
  with pytest.raises(images.ImageError, match="cannot be decoded"):
    images.image_info(full[:len(full) // 2])
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  with pytest.raises(images.ImageError, match="notes.png"):
    images.load_image(str(text))
  with pytest.raises(images.ImageError, match="is a directory"):
    images.load_image(str(tmp_path))


def test_predict_and_the_pipeline_decode_through_load_image(tmp_path):
  from scripts import predict
  from unires_jax.data import pipeline
  exif = Image.Exif()
  exif[images.EXIF_ORIENTATION_TAG] = 6
  photo = tmp_path / "phone.png"
  photo.write_bytes(_saved(Image.fromarray(COLOUR), "PNG", exif=exif.tobytes()))
  expected = images.orient_mask(COLOUR, 6)
  np.testing.assert_array_equal(predict._load_image(str(photo)), expected)
  deep = tmp_path / "deep.png"
  deep.write_bytes(_saved(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"))
  np.testing.assert_array_equal(predict._load_image(str(deep)), _grey_rgb(GREY))
  record = {"dataset": "test", "image_id": 1, "file_name": "phone.png", "height": expected.shape[0],
            "width": expected.shape[1], "image_bytes": photo.read_bytes()}
  np.testing.assert_array_equal(pipeline.decode_image(record), expected)


def test_demo_uploads_are_upright_and_mapped_like_load_image(tmp_path):
  pytest.importorskip("gradio")
  from unires_jax.demo import inputs as demo_inputs
  exif = Image.Exif()
  exif[images.EXIF_ORIENTATION_TAG] = 8
  photo = tmp_path / "phone.png"
  photo.write_bytes(_saved(Image.fromarray(COLOUR), "PNG", exif=exif.tobytes()))
  upload = demo_inputs.load_upload(str(photo))
  np.testing.assert_array_equal(upload.pixels, images.orient_mask(COLOUR, 8))
  assert upload.original_size == (COLOUR.shape[1], COLOUR.shape[0])
  deep = tmp_path / "deep.png"
  deep.write_bytes(_saved(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"))
  np.testing.assert_array_equal(demo_inputs.load_upload(str(deep)).pixels, _grey_rgb(GREY))
