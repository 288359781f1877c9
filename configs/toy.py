"""The embedded default: the tiny model trained on the synthetic multi-granularity set, then evaluated.

    python scripts/train.py --config configs/toy.py --workdir runs/toy

The synthetic set is generated into the workdir on first use (scenes of houses, robots and trees with named
parts; object, multi-object, part and no-target expressions) and prepared into records; training mixes the
gRefCOCO-layout split (objects, several objects, no target) with the CRIS-layout split (objects and parts).
`arg` may be `quick` (a few steps, for tests).
"""

import ml_collections

from configs import common, data_common

LAYOUTS = ("synthetic_grefcoco", "synthetic_cris")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == "quick"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = common.model_config("tiny")
  c.mesh = common.mesh_config(data=-1)
  c.sharding_rules = common.sharding_rules()

  prepared = "{workdir}/prepared"
  c.synthetic = dict(root="{workdir}/synthetic", prepared_dir=prepared, layouts=list(LAYOUTS),
                     splits=["train", "val"], num_images=40 if quick else 400, seed=0, image_size=[96, 128])
  c.data = data_common.data_config("toy", sources=[(f"{prepared}/{layout}/train", 1.0) for layout in LAYOUTS])
  c.data.batch_size = 8
  c.data.toy_tokenizer_prefix = "{workdir}/prepared/toy_tokenizer"

  c.train = common.train_config(total_steps=6 if quick else 3000, log_every=2 if quick else 100,
                                checkpoint_every=3 if quick else 500)
  c.optim = common.optim_config(warmup_steps=2 if quick else 50)
  # The final evaluation's boxes: ground truth, allowed and labelled in every metrics file ("ground-truth boxes")
  # until the toy job evaluates on proposals nobody annotated.
  c.eval = dict(max_new_tokens=12, generate_every_time=False, proposals=common.proposals_config("annotations"),
                allow_gt_boxes=True)
  c.eval_splits = {f"{layout}/val": f"{prepared}/{layout}/val" for layout in LAYOUTS}
  c.evals = {
      "synthetic_grefcoco": dict(type="synthetic", dataset="synthetic", splits={"val": f"{prepared}/synthetic_grefcoco/val"}),
      "synthetic_cris": dict(type="synthetic", dataset="synthetic", splits={"val": f"{prepared}/synthetic_cris/val"}),
  }
  return c
