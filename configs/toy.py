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

  c.train = dict(
      total_steps=6 if quick else 3000,
      log_every=2 if quick else 100,
      eval_every=0,
      checkpoint_every=3 if quick else 500,
      keep_last=2,
      keep_every_steps=0,
      async_checkpoint=True,
      trainable=[".*"],
      frozen=[],
      freeze_inert=True,  # also freeze parameters that cannot affect the loss (UniRESConfig.inert_parameter_patterns)
      loss_weights=dict(ce=1.0, bce=2.0, dice=0.5),
      lora=dict(enabled=False, rank=8, alpha=16.0, stacked_prefixes=["llm/layers/"],
                targets=[["llm/layers/self_attn/(q|k|v)_proj/kernel", 1], ["llm/layers/self_attn/o_proj/kernel", 2],
                         ["llm/layers/mlp/(gate|up|down)_proj/kernel", 1]]),
      peak_flops_per_device=0.0,  # 0: measured with a matmul at start-up
      init_from="",  # a checkpoint (scripts/import_pretrained.py output or a run) to start from
  )
  c.optim = dict(learning_rate=1e-3, warmup_steps=2 if quick else 50, final_lr_ratio=0.05, b1=0.9, b2=0.98,
                 eps=1e-8, weight_decay=0.01, grad_clip=1.0, grad_accum_steps=1, lr_multipliers=[])
  c.eval = dict(max_new_tokens=12, generate_every_time=False)
  c.eval_splits = {f"{layout}/val": f"{prepared}/{layout}/val" for layout in LAYOUTS}
  c.evals = {
      "synthetic_grefcoco": dict(type="synthetic", dataset="synthetic", splits={"val": f"{prepared}/synthetic_grefcoco/val"}),
      "synthetic_cris": dict(type="synthetic", dataset="synthetic", splits={"val": f"{prepared}/synthetic_cris/val"}),
  }
  return c
