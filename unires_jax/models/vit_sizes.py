"""The sizes every ViT config shares (CLIP's and SAM's): the width split over heads, the image into patches."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VitSizes:
  """The leading fields of `ClipVitConfig` and `SamVitConfig`; `check_vit_sizes()` (from their `__post_init__`)
  refuses sizes that do not divide, naming the config class."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int

  def check_vit_sizes(self) -> None:
    name = type(self).__name__
    if self.width % self.num_heads:
      raise ValueError(f"{name}: width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"{name}: image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def grid_size(self) -> int:
    """Patches per side at the native resolution (the position-embedding grid; SAM's global attention size)."""
    return self.image_size // self.patch_size
