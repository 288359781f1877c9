"""What every script in scripts/ does with an error: a known one is a short message naming the thing, exit 2.

Known errors are the project's `UserError`s and the built-in kinds a bad input raises (a missing, unreadable or
misplaced file, a bad value or key). Anything else is a bug and keeps its traceback. `--verbose` on any script's
command line shows the traceback of known errors too.

Light on purpose (no JAX import): `scripts/prepare_data.py` forks workers after importing it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from unires_jax.errors import UserError

KNOWN_ERRORS = (UserError, OSError, ValueError, KeyError)
VERBOSE_FLAG = "--verbose"
EXIT_KNOWN_ERROR = 2


def message(error: BaseException) -> str:
  """The error's own words: a KeyError without its quotes, an OSError as `path: reason` when it has no text."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    return error.args[0]
  if isinstance(error, OSError) and error.strerror and len(error.args) == 2:  # the system's words, no errno
    return f"{error.filename}: {error.strerror}" if error.filename is not None else error.strerror
  return str(error) or type(error).__name__


def take_verbose_flag(argv: list[str]) -> bool:
  """Removes `--verbose` from `argv` in place; True if it was there."""
  found = VERBOSE_FLAG in argv
  argv[:] = [arg for arg in argv if arg != VERBOSE_FLAG]
  return found


def report(error: BaseException, program: str) -> None:
  print(f"{program}: error: {message(error)}", file=sys.stderr)


def guarded(main: Callable[..., Any], program: str, verbose: bool) -> Callable[..., Any]:
  """`main` with its known errors reported (exit 2) instead of raised, unless `verbose`."""
  def run(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except KNOWN_ERRORS as error:
      if verbose:
        raise
      report(error, program)
      sys.exit(EXIT_KNOWN_ERROR)
  return run


def run_main(main: Callable[..., Any], program: str, absl_app: bool = False) -> Any:
  """Runs a script's `main` (through `absl.app.run` for absl-flag scripts) with the error handling above."""
  verbose = take_verbose_flag(sys.argv)
  if absl_app:
    from absl import app
    return app.run(guarded(main, program, verbose))
  return guarded(main, program, verbose)()


CONFIG_OVERRIDE_PREFIX = "--config."


def apply_config_overrides(config, overrides: list[str]):
  """`--config.a.b=value` arguments (as train.py takes them) applied to an ml_collections ConfigDict.

  The value is read as a Python literal (`2`, `1e-4`, `True`, `(1,2)`, `'text'`), else as a plain string, and must
  fit the type of the value it replaces; an unknown key or a value of another type is a ValueError naming it.
  """
  import ast

  for argument in overrides:
    if not argument.startswith(CONFIG_OVERRIDE_PREFIX) or "=" not in argument:
      raise ValueError(f"unexpected argument {argument!r}; expected --config.<key>=<value>")
    key, text = argument[len(CONFIG_OVERRIDE_PREFIX):].split("=", 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts[:-1]):
      if part not in node:
        raise ValueError(f"--config.{key}: the config has no key {'.'.join(parts[:depth + 1])!r}")
      node = node[part]
    leaf = parts[-1]
    if leaf not in node:
      raise ValueError(f"--config.{key}: the config has no key {key!r}")
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if current is not None and not isinstance(value, type(current)):
      raise ValueError(f"--config.{key}={text}: expected a {type(current).__name__} like the current value "
                       f"{current!r}")
    with config.unlocked() if hasattr(config, "unlocked") else _nothing():
      node[leaf] = value
  return config


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False
