"""What a person sends, checked: the uploaded file must be an image (a huge one is downscaled, with a note) and the
phrase must hold some text. Problems raise `DemoInputError`, whose message the page shows as it is."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image

from unires_jax.data import images

DEFAULT_MAX_IMAGE_SIDE = 2048  # pixels of the longer side above which an upload is downscaled


class DemoInputError(ValueError):
  """A problem with the request itself (file, phrase); its message is written for the person using the page."""


@dataclasses.dataclass(frozen=True)
class UploadedImage:
  """Decoded RGB pixels and the notes the page shows about them."""
  pixels: np.ndarray        # uint8 [h, w, 3]
  original_size: tuple[int, int]  # (height, width) of the file
  note: str = ""


def load_upload(path: str | None, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> UploadedImage:
  """The image file at `path` as RGB pixels, downscaled (aspect kept) when its longer side exceeds `max_side`."""
  if not path:
    raise DemoInputError("No image: upload an image file (PNG, JPEG, …) or pick an example.")
  name = os.path.basename(path)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse rather than decode a giant
      with Image.open(path) as image:
        width, height = image.size
        if images.exif_orientation(image) in (5, 6, 7, 8):  # shown turned a quarter: the sides swap
          width, height = height, width
        if max(width, height) > max_side:
          image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale right away
        rgb = Image.fromarray(images.upright_rgb(image))  # as a viewer shows it: EXIF, 16-bit, alpha, CMYK
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
    raise DemoInputError(f"{name!r} is too large to decode safely ({error}).") from error
  except (OSError, SyntaxError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
    raise DemoInputError(f"{name!r} is not an image that can be read (expected PNG, JPEG, WebP, …): "
                         f"{error}.") from error
  if min(width, height) < 1:
    raise DemoInputError(f"{name!r} is an empty image ({width}×{height} pixels).")
  note = ""
  if max(width, height) > max_side:
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if rgb.size != size:  # a JPEG draft may already be part of the way there
      rgb = rgb.resize(size, Image.BILINEAR)
    note = (f"The image ({width}×{height} pixels) was downscaled to {size[0]}×{size[1]} (longer side at most "
            f"{max_side}); the mask is at the downscaled size.")
  return UploadedImage(pixels=np.asarray(rgb, np.uint8), original_size=(height, width), note=note)


def check_phrase(phrase: str | None) -> str:
  """The phrase without surrounding whitespace; an empty one is an error."""
  text = (phrase or "").strip()
  if not text:
    raise DemoInputError("No phrase: type what to segment, e.g. \"the roof of the green house\".")
  return text
