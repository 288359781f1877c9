"""Proposals for a prepared split or a folder of images, written as COCO detection-results files.

    python scripts/propose.py --config configs/propose.py --split-dir prepared/refcocom/val \
        --out-objects proposals/val_objects.json --out-parts proposals/val_parts.json \
        [--config.proposals.source=sam --config.proposals.sam.checkpoint=... --config.batch_size=8]

`proposals` is the shared section (configs/common.py, `proposals_config`); `batch_size` is how many images the
source sees per call.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.proposals = common.proposals_config("sam")
  c.batch_size = 8
  c.progress = True  # the tqdm bar
  return c
