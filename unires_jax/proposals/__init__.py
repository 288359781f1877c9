"""Object and part proposals: the boxes the model reads as object and part tokens, from a source chosen by config.

`build_source(config.proposals)` returns a `ProposalSource` from the `SOURCES` registry (`base.py` documents the
contract). Importing this package registers every built-in source.
"""

from unires_jax.proposals.base import (SOURCES, ImageInput, ImageProposals, ProposalSource, attach, build_source,
                                       empty_proposals)
from unires_jax.proposals import annotations  # noqa: F401  (registers 'annotations' and 'none')
from unires_jax.proposals import colour_regions  # noqa: F401  (registers 'colour_regions')
from unires_jax.proposals import detections  # noqa: F401  (registers 'detections')
from unires_jax.proposals import sam  # noqa: F401  (registers 'sam')

__all__ = ["SOURCES", "ImageInput", "ImageProposals", "ProposalSource", "attach", "build_source",
           "empty_proposals"]
