"""Import of a LISA-layout checkpoint and the sharded export of the result: seconds and peak RSS, each in a fresh process.

    python scripts/benchmark_lisa.py --size 1b --out docs/benchmarks/convert_lisa.json

1. A `configs/lisa.py:SIZE` checkpoint with random weights is written as LISA publishes one: bfloat16
   `pytorch_model-0000i-of-0000n.bin` shards with `pytorch_model.bin.index.json`, LISA's tensor names (from
   `convert/lisa.py`'s table applied backwards to the model's param shapes, no PyTorch model built),
   `added_tokens.json` and a small SentencePiece `tokenizer.model`. The CLIP tower is not in a LISA checkpoint and
   is initialised fresh by the import.
2. `scripts/import_pretrained.py --lisa` runs in its own process; its wall time and peak RSS are recorded.
3. `scripts/convert_to_pytorch.py` exports that import, sharded (`--max-shard-size`), once per `--dtypes`, each
   in its own process. The memory bound of a streaming export is
   peak RSS < model bytes (the params loaded once) + one shard + the fixed overhead, where the overhead is the peak
   RSS of a process that only imports both scripts' modules and starts JAX's backend.

Each step's seconds and peak RSS are its own process's, from GNU time (`/usr/bin/time -f "%e %M"`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from configs import lisa as lisa_config  # noqa: E402
from unires_jax import benchmark_io, cli, perf  # noqa: E402
from unires_jax.convert import lisa as lisa_convert  # noqa: E402
from unires_jax.convert import shards  # noqa: E402
from unires_jax.convert.unires import param_shapes  # noqa: E402
from unires_jax.models.unires import UniRESConfig  # noqa: E402

LISA_INDEX = "pytorch_model.bin.index.json"
LISA_ADDED_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "[SEG]")  # LISA-7B-v1's added_tokens.json
TOKENIZER_TEXT = ("the red house on the left", "What is the cat in this image? Please output segmentation mask.",
                  lisa_config.LLAVA_V1_SYSTEM, "USER: ASSISTANT: It is [SEG].")
TIME = "/usr/bin/time"
OVERHEAD_CODE = ("import jax; from scripts import convert_to_pytorch, import_pretrained; "
                 "jax.devices()")


def _lisa_tensors(cfg: UniRESConfig, seed: int):
  """Yields (LISA tensor name, float32 array) for everything `lisa_table` reads, from the model's param shapes."""
  shapes = param_shapes(cfg)
  rng = np.random.default_rng(seed)
  for entry in lisa_convert.lisa_table(cfg):
    shape = shapes[entry.jax_path]
    layers = range(shape[0]) if entry.stacked else [None]
    for i in layers:
      layer_shape = shape[1:] if entry.stacked else shape
      value = rng.standard_normal(layer_shape, dtype=np.float32) * 0.02
      if entry.jax_path.endswith("/scale"):
        value += 1.0
      tensors = entry.to_torch(value)
      for name, tensor in zip(entry.torch_names, tensors if isinstance(tensors, tuple) else (tensors,)):
        yield (name.format(i=i) if entry.stacked else name), np.ascontiguousarray(tensor)


def write_lisa_folder(directory: str, config, max_shard_bytes: int, seed: int = 0) -> dict:
  """A LISA Hugging Face folder with random weights (bf16 `.bin` shards + index, tokenizer); returns its summary."""
  import sentencepiece as spm
  import torch

  os.makedirs(directory, exist_ok=True)
  cfg = UniRESConfig.from_config(config.model)
  start = time.perf_counter()
  buffer, buffer_bytes, temporary = {}, 0, []

  def flush():
    path = os.path.join(directory, f"part{len(temporary):05d}.bin")
    torch.save(buffer, path)
    temporary.append((path, list(buffer)))

  num_tensors = total_bytes = 0
  for name, array in _lisa_tensors(cfg, seed):
    tensor = torch.from_numpy(array).to(torch.bfloat16)
    if buffer and buffer_bytes + tensor.nbytes > max_shard_bytes:
      flush()
      buffer, buffer_bytes = {}, 0
    buffer[name] = tensor
    buffer_bytes += tensor.nbytes
    num_tensors += 1
    total_bytes += tensor.nbytes
  flush()
  weight_map, files = {}, []
  for number, (path, names) in enumerate(temporary, start=1):
    final = f"pytorch_model-{number:05d}-of-{len(temporary):05d}.bin"
    os.replace(path, os.path.join(directory, final))
    weight_map.update({name: final for name in names})
    files.append(final)
  with open(os.path.join(directory, LISA_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)

  prefix = os.path.join(directory, "tokenizer")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT * 4), model_prefix=prefix, vocab_size=300,
                                 model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 hard_vocab_limit=False, num_threads=1, minloglevel=2)
  base = spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()
  with open(os.path.join(directory, "added_tokens.json"), "w") as f:
    json.dump({token: base + k for k, token in enumerate(LISA_ADDED_TOKENS)}, f)
  return {"seconds": time.perf_counter() - start, "num_tensors": num_tensors, "bytes": total_bytes,
          "files": files + [LISA_INDEX]}


def run_measured(args: list[str], log_path: str) -> dict:
  """Runs `python args...` from the repository root in a fresh process; its wall seconds and own peak RSS.

  Measured by `/usr/bin/time` (`%e %M`): the rusage `os.wait4` returns for a child started from this process is
  not the child's alone (Linux carries the parent's high-water RSS across vfork + exec, so a 1.5 GB parent makes
  `python -c pass` read 1.5 GB), while the child `/usr/bin/time` forks starts from its own few MB.
  """
  if not os.path.exists(TIME):
    raise FileNotFoundError(f"{TIME} (GNU time) is needed to measure each step's own peak RSS")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  timing = log_path + ".time"
  with open(log_path, "w") as log:
    returncode = subprocess.call([TIME, "-f", "%e %M", "-o", timing, sys.executable, *args], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
  if returncode != 0:
    with open(log_path) as log:
      tail = log.read()[-3000:]
    raise RuntimeError(f"{' '.join(args[:2])} exited with {returncode}; its output ends:\n{tail}")
  with open(timing) as f:
    seconds, max_rss_kib = f.read().split()[-2:]
  return {"seconds": float(seconds), "peak_rss_bytes": int(max_rss_kib) * 1024}


def export_shards(directory: str) -> dict:
  """The shard files of one exported safetensors folder (`model` prefix), checked against its index."""
  index_path = os.path.join(directory, shards.index_file("model"))
  if not os.path.exists(index_path):
    return {"files": ["model.safetensors"], "index": None,
            "largest_shard_bytes": os.path.getsize(os.path.join(directory, "model.safetensors"))}
  with open(index_path) as f:
    listed = sorted(set(json.load(f)["weight_map"].values()))
  present = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  if listed != present:
    raise ValueError(f"{index_path!r} names shards {listed}, the folder holds {present}")
  return {"files": present, "index": shards.index_file("model"),
          "largest_shard_bytes": max(os.path.getsize(os.path.join(directory, n)) for n in present)}


def benchmark(size: str, workdir: str, lisa_shard_bytes: int, export_shard: str, dtypes: list[str]) -> dict:
  config = lisa_config.get_config(size)
  lisa_dir, imported = os.path.join(workdir, f"LISA-{size}"), os.path.join(workdir, f"import_{size}")
  written = write_lisa_folder(lisa_dir, config, lisa_shard_bytes)
  print(f"wrote {written['num_tensors']} tensors ({written['bytes'] / 2**30:.2f} GiB) in {written['seconds']:.1f}s",
        flush=True)
  overhead = run_measured(["-c", OVERHEAD_CODE], os.path.join(workdir, "overhead.log"))
  imported_run = run_measured(["scripts/import_pretrained.py", "--config", f"configs/lisa.py:{size}", "--out",
                               imported, "--lisa", lisa_dir], os.path.join(workdir, "import.log"))
  with open(os.path.join(imported, "import_report.json")) as f:
    import_report = json.load(f)
  num_params = import_report["num_params"]
  model_bytes = num_params * np.dtype(config.model.param_dtype).itemsize
  print(f"import: {num_params:,} params in {imported_run['seconds']:.1f}s, "
        f"peak {imported_run['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
  max_shard_bytes = shards.parse_size(export_shard)
  exports = []
  for dtype in dtypes:
    out = os.path.join(workdir, f"export_{size}_{dtype}")
    run = run_measured(["scripts/convert_to_pytorch.py", "--checkpoint", imported, "--dtype", dtype,
                        "--max-shard-size", export_shard, "--out", out], os.path.join(workdir, f"export_{dtype}.log"))
    llm = export_shards(os.path.join(out, "llm"))
    bound = model_bytes + max_shard_bytes + overhead["peak_rss_bytes"]
    exports.append(dict(run, dtype=dtype, max_shard_bytes=max_shard_bytes, llm_shards=llm["files"],
                        llm_index=llm["index"], largest_shard_bytes=llm["largest_shard_bytes"], bound_bytes=bound,
                        within_bound=run["peak_rss_bytes"] < bound,
                        excess_over_bound_bytes=max(0, run["peak_rss_bytes"] - bound),
                        ratio_to_model_bytes=run["peak_rss_bytes"] / model_bytes))
    print(f"export {dtype}: {run['seconds']:.1f}s, peak {run['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"({exports[-1]['ratio_to_model_bytes']:.2f} × model bytes, bound {bound / 2**30:.2f} GiB)", flush=True)
  return {"size": size, "config": f"configs/lisa.py:{size}", "num_params": num_params, "model_bytes": model_bytes,
          "lisa_checkpoint": written, "overhead": overhead,
          "import": dict(imported_run, num_imported_tensors=import_report["num_imported_tensors"],
                         num_initialised_tensors=import_report["num_initialised_tensors"],
                         ratio_to_model_bytes=imported_run["peak_rss_bytes"] / model_bytes),
          "exports": exports}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="1b", choices=lisa_config.SIZES, help="configs/lisa.py size")
  parser.add_argument("--lisa-shard-size", default="2GB", help="largest .bin shard of the written LISA folder")
  parser.add_argument("--max-shard-size", default="1GB", help="largest safetensors shard of the export")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated export dtypes")
  parser.add_argument("--workdir", help="where the checkpoint, import and exports go (default: a temporary folder)")
  parser.add_argument("--out", required=True, help="JSON file for the results")
  args = parser.parse_args(argv)
  dtypes = args.dtypes.split(",")
  for dtype in dtypes:
    shards.numpy_dtype(dtype)  # an unknown dtype is refused before anything is written
  with tempfile.TemporaryDirectory() as scratch:
    result = benchmark(args.size, args.workdir or scratch, shards.parse_size(args.lisa_shard_size),
                       args.max_shard_size, dtypes)
  report = dict(date=datetime.date.today().isoformat(), machine=perf.machine(),
                load_average=list(os.getloadavg()), **result)
  benchmark_io.write_report(args.out, report)


if __name__ == "__main__":
  cli.run_main(main, "benchmark_lisa.py")
