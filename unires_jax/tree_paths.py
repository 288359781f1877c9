"""Parameter paths as 'a/b/c' strings, the form every regex on parameters (trainable, frozen, LoRA targets,
learning-rate groups) matches against."""

from __future__ import annotations


def param_path(path) -> str:
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    parts.append(str(name))
  return "/".join(parts)
