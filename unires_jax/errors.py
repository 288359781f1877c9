"""The base of the project's own errors about inputs, files, checkpoints and the environment.

Command-line tools (`unires_jax.cli`) print such an error as its message alone, with exit status 2.
"""


class UserError(Exception):
  """Something a user can fix (a file, a config value, a checkpoint, a busy workdir), named in the message."""
