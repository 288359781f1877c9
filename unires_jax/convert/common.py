"""What every conversion table shares: tensors from either framework as numpy arrays."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def tensor_to_numpy(value) -> np.ndarray:
  """A torch tensor (bfloat16 kept bit-exact as ml_dtypes' bfloat16) or array-like → numpy array."""
  if hasattr(value, "detach"):
    import torch  # only reached with a torch tensor in hand

    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)
