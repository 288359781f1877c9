"""The command-line tools as a person runs them: a known error is one line naming the thing, exit 2; `--verbose`
shows the traceback. Covers a workdir that is a file or read-only, a predictions path that is a folder, and a
weights file that is not a torch checkpoint."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from unires_jax import cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess, program: str) -> str:
  """The tool's one error line (library log lines aside); the exit status is 2 and there is no traceback."""
  assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def test_messages_of_known_errors():
  assert cli.message(KeyError("train config: unknown key 'x'")) == "train config: unknown key 'x'"
  assert cli.message(IsADirectoryError(21, "Is a directory")) == "Is a directory"
  error = IsADirectoryError(21, "Is a directory", "/data/preds")
  assert cli.message(error) == "/data/preds: Is a directory"


def test_train_names_a_workdir_that_is_a_file_and_verbose_shows_the_traceback(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  command = ("scripts/train.py", "--config", "configs/toy.py:quick", f"--workdir={afile}")
  line = error_line(run_script(*command), "train.py")
  assert line == f"train.py: error: workdir '{afile}' is a file, not a directory"
  verbose = run_script(*command, "--verbose")
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "NotADirectoryError" in verbose.stderr


def test_train_names_a_read_only_workdir(tmp_path):
  readonly = tmp_path / "ro"
  readonly.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True)
  if mounted.returncode:
    pytest.skip(f"no read-only mount possible here: {mounted.stderr!r}")
  try:
    line = error_line(run_script("scripts/train.py", "--config", "configs/toy.py:quick", f"--workdir={readonly}"),
                      "train.py")
  finally:
    subprocess.run(["umount", "-l", str(readonly)], check=False)
  assert line.startswith(f"train.py: error: workdir '{readonly}' is not writable")


def test_eval_names_a_predictions_path_that_is_a_folder(tmp_path):
  folder = tmp_path / "predictions"
  folder.mkdir()
  line = error_line(run_script("scripts/eval.py", "--config", "configs/eval/synthetic.py:val",
                               f"--config.predictions={folder}", f"--config.data_dir={tmp_path}"), "eval.py")
  assert line == (f"eval.py: error: predictions path {folder} is a directory; expected a predictions .jsonl file "
                  f"(one JSON object per line)")


def test_import_names_a_weights_file_that_is_not_a_torch_checkpoint(tmp_path):
  pytest.importorskip("torch")
  weights = tmp_path / "pytorch_model.bin"
  weights.write_bytes(pickle.dumps({"model.embed_tokens.weight": [[0.0]]}))
  line = error_line(run_script("scripts/import_pretrained.py", "--config", "configs/tiny.py", "--out",
                               str(tmp_path / "out"), "--llm", str(weights)), "import_pretrained.py")
  assert f"weights file {weights} is not a torch checkpoint" in line and "plain Python pickle" in line
