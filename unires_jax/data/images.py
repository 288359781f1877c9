"""Images as people have them → the uint8 RGB a viewer shows: EXIF orientation applied, every PIL mode mapped.

- EXIF orientation (phone photos): the pixels are turned upright (`ImageOps.exif_transpose`), so masks come back
  in the orientation the user sees. `orient_mask` / `orient_boxes` move annotations made on the stored pixels the
  same way.
- Modes: 16-bit (`I;16*`, and `I` as Pillow opens 16-bit PNG/TIFF) scale 0..65535 → 0..255; float (`F`) is read
  as 0..1 when its values lie there, else as 0..255; transparency (`LA`, `PA`, `RGBA`, `P` with a transparent
  index) is composited on white; `CMYK`, `YCbCr`, `1`, `L`, `P` and the rest go through Pillow's own conversion.
- A truncated or undecodable file is an `ImageError` naming it (every pixel is decoded, not only the header).
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from unires_jax.errors import UserError

ImageSource = Union[str, os.PathLike, bytes]
BACKGROUND = (255, 255, 255)  # what transparent pixels are shown on
EXIF_ORIENTATION_TAG = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageError(UserError, ValueError):
  """An image file that cannot be decoded, named."""


def _describe(source: ImageSource, where: str | None) -> str:
  name = "image bytes" if isinstance(source, bytes) else f"image {os.fspath(source)!r}"
  return f"{where}: {name}" if where else name


def _open(source: ImageSource) -> Image.Image:
  return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)  # [h, w]
  return np.repeat(grey[..., None], 3, axis=-1)  # [h, w, 3]


def to_rgb(image: Image.Image) -> np.ndarray:
  """A decoded PIL image of any mode → uint8 [h, w, 3] as a viewer shows it (see the module docstring)."""
  mode = image.mode
  if mode in SIXTEEN_BIT_MODES:
    values = np.asarray(image, np.float64)  # [h, w]; I;16 arrays come out as uint16, I as int32
    return _grey_to_rgb(np.clip(values, 0, 65535) / 257.0)
  if mode == "F":
    values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0)  # [h, w]
    finite_max = float(values.max()) if values.size else 0.0
    return _grey_to_rgb(values * 255.0 if finite_max <= 1.0 else values)
  if mode in ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), np.uint8)
  return np.asarray(image.convert("RGB"), np.uint8)


def exif_orientation(image: Image.Image) -> int:
  """The EXIF orientation (1..8; 1 = as stored) of an opened image."""
  try:
    value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
  except (TypeError, ValueError, SyntaxError):
    return 1  # a damaged EXIF block: show the pixels as stored
  return value if 1 <= value <= 8 else 1


def upright_rgb(image: Image.Image) -> np.ndarray:
  """An opened image → uint8 [h, w, 3]: EXIF orientation applied, its mode mapped as `to_rgb` does."""
  return to_rgb(ImageOps.exif_transpose(image))


def load_image(source: ImageSource, where: str | None = None) -> np.ndarray:
  """uint8 [h, w, 3] RGB of an image file or its bytes, upright (EXIF applied), every pixel decoded.

  `where` (e.g. "refcoco.json entry 12") prefixes the error message.
  """
  what = _describe(source, where)
  if not isinstance(source, bytes):
    if os.path.isdir(source):
      raise ImageError(f"{what} is a directory, not an image file")
    if not os.path.exists(source):
      raise FileNotFoundError(f"{what} does not exist")
  try:
    with _open(source) as image:
      image.load()  # every pixel: a truncated file fails here, not later in training
      return upright_rgb(image)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise ImageError(f"{what} cannot be decoded ({type(error).__name__}: {error})") from error


def image_info(source: ImageSource, where: str | None = None) -> tuple[int, int, int]:
  """(displayed height, displayed width, EXIF orientation) after decoding every pixel (an `ImageError` if the
  file is truncated or not an image)."""
  what = _describe(source, where)
  try:
    with _open(source) as image:
      image.load()
      orientation = exif_orientation(image)
      width, height = image.size
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise ImageError(f"{what} cannot be decoded ({type(error).__name__}: {error})") from error
  if orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
    height, width = width, height
  return height, width, orientation


def read_orientation(source: ImageSource) -> int:
  """The EXIF orientation from the file's header alone (no pixels decoded); 1 when there is none."""
  try:
    with _open(source) as image:
      return exif_orientation(image)
  except (OSError, ValueError, SyntaxError):
    return 1


# Each orientation as numpy operations on an [h, w, ...] array, in Pillow's exif_transpose order.
def orient_mask(array: np.ndarray, orientation: int) -> np.ndarray:
  """An array [h, w, ...] on the stored pixels → the same array on the upright image (as `exif_transpose`)."""
  if orientation == 2:
    return array[:, ::-1]
  if orientation == 3:
    return array[::-1, ::-1]
  if orientation == 4:
    return array[::-1]
  if orientation == 5:
    return np.swapaxes(array, 0, 1)
  if orientation == 6:
    return np.swapaxes(array, 0, 1)[:, ::-1]
  if orientation == 7:
    return np.swapaxes(array, 0, 1)[::-1, ::-1]
  if orientation == 8:
    return np.swapaxes(array, 0, 1)[::-1]
  return array


def orient_boxes(boxes: np.ndarray, orientation: int, height: int, width: int) -> np.ndarray:
  """Boxes [N, 4] (x0, y0, x1, y1) on the stored `height × width` pixels → the same boxes on the upright image."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  x0, y0, x1, y1 = boxes.T
  if orientation in (5, 6, 7, 8):  # transpose first: x ↔ y
    x0, y0, x1, y1 = y0, x0, y1, x1
    height, width = width, height
  flip_x = orientation in (2, 3, 6, 7)
  flip_y = orientation in (3, 4, 7, 8)
  if flip_x:
    x0, x1 = width - x1, width - x0
  if flip_y:
    y0, y1 = height - y1, height - y0
  return np.stack([x0, y0, x1, y1], axis=-1)
