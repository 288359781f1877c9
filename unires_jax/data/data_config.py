"""The `config.data` section as frozen dataclasses, checked when built (configs/data_common.py documents it)."""

from __future__ import annotations

import dataclasses

from unires_jax.data import proposal_noise as noise_lib
from unires_jax.data import tokenizer as tokenizer_lib
from unires_jax.data.box_sources import BOX_SOURCES
from unires_jax.data.prompts import PROMPT_STYLES

TOO_LONG_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One prepared split (a directory written by `records.write_split`) and its mixture weight."""
  dir: str
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `config.data` section (configs/data_common.py documents every key)."""
  sources: tuple[SourceConfig, ...]
  batch_size: int
  max_text_len: int
  instruction_templates: tuple[str, ...]
  answer_templates: tuple[str, ...]
  no_target_answer_templates: tuple[str, ...]
  seed: int = 0
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 4
  read_buffer_size: int = 64
  box_source: str = "annotations"
  proposal_noise: noise_lib.NoiseConfig = dataclasses.field(default_factory=noise_lib.NoiseConfig)
  targets_first: bool = True
  too_long: str = "error"
  tokenizer_path: str = ""
  toy_tokenizer_prefix: str = ""
  toy_tokenizer_vocab_size: int = 512
  prompt_style: str = "unires"
  system_prompt: str = ""
  answer_decision_weight: float = 1.0
  no_target_decision_scale: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "sources", tuple(
        s if isinstance(s, SourceConfig) else SourceConfig(**dict(s)) for s in self.sources))
    for name in ("instruction_templates", "answer_templates", "no_target_answer_templates"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not isinstance(self.proposal_noise, noise_lib.NoiseConfig):
      object.__setattr__(self, "proposal_noise", noise_lib.NoiseConfig.from_dict(dict(self.proposal_noise)))
    if self.box_source not in BOX_SOURCES:
      raise ValueError(f"data.box_source {self.box_source!r}: expected one of {BOX_SOURCES}")
    if self.prompt_style not in PROMPT_STYLES:
      raise ValueError(f"data.prompt_style {self.prompt_style!r}: expected one of {sorted(PROMPT_STYLES)}")
    if self.too_long not in TOO_LONG_POLICIES:
      raise ValueError(f"data.too_long {self.too_long!r}: expected one of {TOO_LONG_POLICIES}")
    if not self.answer_decision_weight > 0:
      raise ValueError(f"data.answer_decision_weight must be > 0, got {self.answer_decision_weight!r}")
    if not self.no_target_decision_scale > 0:
      raise ValueError(f"data.no_target_decision_scale must be > 0, got {self.no_target_decision_scale!r}")
    if any(s.weight <= 0 for s in self.sources):
      raise ValueError(f"data.sources weights must be positive, got {[s.weight for s in self.sources]}")
    if not (self.instruction_templates and self.answer_templates and self.no_target_answer_templates):
      raise ValueError("data.instruction_templates, answer_templates and no_target_answer_templates must be "
                       "non-empty lists")
    for template in self.instruction_templates:
      if "{phrase}" not in template:
        raise ValueError(f"data.instruction_templates entry {template!r}: expected a '{{phrase}}' field")
    for template in self.answer_templates:
      if tokenizer_lib.SEG_TOKEN not in template:
        raise ValueError(f"data.answer_templates entry {template!r}: a targeted answer must contain "
                         f"{tokenizer_lib.SEG_TOKEN}")
    for template in self.no_target_answer_templates:
      if tokenizer_lib.SEG_TOKEN in template:
        raise ValueError(f"data.no_target_answer_templates entry {template!r}: a no-target answer must not "
                         f"contain {tokenizer_lib.SEG_TOKEN}")
