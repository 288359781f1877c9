"""The model, training and LISA import/export benchmarks run end to end on tiny configs and write positive,
consistent figures."""

from __future__ import annotations

import json
import math
import os

import pytest

from scripts import benchmark_decode_layers, benchmark_lisa, benchmark_model, benchmark_train
from unires_jax import benchmark_io, perf


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw amx_bf16 amx_tile

processor\t: 1
model name\t: another name
flags\t\t: fpu
"""


def test_cpu_description_names_the_first_processor_and_its_vector_units():
  assert perf.cpu_description(CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+ (avx2, avx512f, amx_tile)"
  assert perf.cpu_description("model name : Old CPU\nflags : fpu sse2\n") == (
      "Old CPU (none of avx2/avx512f/avx512_bf16/amx_tile)")


def test_batch_sizes_option_overrides_the_defaults_and_names_a_bad_entry():
  defaults = {"tiny": 8, "small": 2}
  assert benchmark_io.parse_batch_sizes("", defaults) == defaults
  assert benchmark_io.parse_batch_sizes("small=4,tiny=1", defaults) == {"tiny": 1, "small": 4}
  with pytest.raises(ValueError, match=r"'huge=4': 'huge' is not a model size; expected one of \['small', 'tiny'\]"):
    benchmark_io.parse_batch_sizes("huge=4", defaults)
  for bad in ("small", "small=0", "small=-2", "small=two"):
    with pytest.raises(ValueError, match=f"--batch-sizes entry '{bad}': expected size=batch"):
      benchmark_io.parse_batch_sizes(bad, defaults)


def test_report_is_replaced_whole_and_a_failed_write_keeps_the_previous_one(tmp_path):
  path = str(tmp_path / "new_folder" / "report.json")
  benchmark_io.write_report(path, {"figure": 1.5})
  assert json.loads(open(path).read()) == {"figure": 1.5}
  with pytest.raises(TypeError):
    benchmark_io.write_report(path, {"figure": object()})  # not JSON: fails halfway through the dump
  assert json.loads(open(path).read()) == {"figure": 1.5}
  assert os.listdir(tmp_path / "new_folder") == ["report.json"]  # no temporary file left behind


def test_devices_option_takes_the_first_n_and_refuses_more_than_there_are():
  import jax

  assert perf.select_devices(0) == jax.devices()
  assert perf.select_devices(1) == jax.devices()[:1]
  assert perf.machine(perf.select_devices(1))["device_count"] == 1
  count = jax.device_count()
  with pytest.raises(ValueError, match=f"--devices {count + 1}: expected 0 \\(all\\) to {count}"):
    perf.select_devices(count + 1)


@pytest.mark.slow
def test_benchmark_model_tiny(tmp_path):
  out = tmp_path / "model.json"
  benchmark_model.main(["--out", str(out), "--sizes", "tiny", "--repeats", "1", "--depths", "2",
                        "--unscanned-depths", "", "--matmul-size", "256"])
  report = json.loads(out.read_text())
  assert set(report) >= {"date", "machine", "matmul_peak_flops_per_s", "sizes", "depth_compile"}
  assert report["machine"]["device_count"] == 8  # all of the suite's devices when --devices is not given
  assert _positive(report["matmul_peak_flops_per_s"])
  (tiny,) = report["sizes"]
  assert tiny["size"] == "tiny" and tiny["batch_size"] == 8
  for part in ("forward", "train_step"):
    figures = tiny[part]
    for key in ("compile_s", "step_s", "flops", "flops_per_s", "mfu"):
      assert _positive(figures[key]), (part, key, figures[key])
    # The reported rate is exactly FLOPs ÷ time, and MFU that rate ÷ the measured peak.
    assert figures["flops_per_s"] == pytest.approx(figures["flops"] / figures["step_s"])
    assert figures["mfu"] == pytest.approx(figures["flops_per_s"] / report["matmul_peak_flops_per_s"])
  # A train step is forward + backward + update: more work than a forward pass.
  assert tiny["train_step"]["flops"] > 2 * tiny["forward"]["flops"]
  (depth,) = report["depth_compile"]
  assert depth["num_layers"] == 2 and depth["scan_layers"] is True and _positive(depth["train_step_compile_s"])
  # The depth-2 scanned tiny model is the tiny config itself: same parameter count.
  assert depth["param_count"] == tiny["param_count"] > tiny["llm_param_count"] > 0


@pytest.mark.slow
def test_benchmark_train_tiny(tmp_path):
  out = tmp_path / "train.json"
  benchmark_train.main(["--out", str(out), "--size", "tiny", "--steps", "1", "--devices", "1"])  # of the suite's 8
  report = json.loads(out.read_text())
  assert report["device_count"] == report["machine"]["device_count"] == 1
  assert set(report) >= {"date", "machine", "matmul_peak_flops_per_s", "sizes"}
  (tiny,) = report["sizes"]
  for key in ("compile_s", "step_s", "examples_per_s", "flops_per_step", "flops_per_s", "mfu",
              "peak_host_memory_mb", "param_count"):
    assert _positive(tiny[key]), (key, tiny[key])
  assert tiny["examples_per_s"] == pytest.approx(tiny["batch_size"] / tiny["step_s"])
  assert math.isfinite(tiny["final_loss"])


def test_benchmark_train_refuses_a_missing_device(tmp_path):
  with pytest.raises(RuntimeError, match="--device gpu"):
    benchmark_train.main(["--out", str(tmp_path / "x.json"), "--size", "1b", "--device", "gpu"])


def test_benchmark_train_refuses_a_device_kind_it_was_not_promised(tmp_path):
  with pytest.raises(RuntimeError, match="--expect-device 'H200'"):
    benchmark_train.main(["--out", str(tmp_path / "x.json"), "--size", "tiny", "--expect-device", "H200"])


@pytest.mark.slow
def test_benchmark_train_recipe_trains_lora_only_and_reports_tokens(tmp_path):
  """The full recipe on the tiny size: frozen encoders and LLM, LoRA factors trained, the report's new fields."""
  out = tmp_path / "train.json"
  benchmark_train.main(["--out", str(out), "--size", "tiny", "--steps", "1", "--recipe", "unires_7b",
                        "--expect-device", "cpu"])
  (tiny,) = json.loads(out.read_text())["sizes"]
  assert tiny["recipe"] == "configs/unires_7b.py" and tiny["remat_policy"] == "nothing_saveable"
  assert 0 < tiny["trainable_count"] < tiny["param_count"]
  assert tiny["tokens_per_s"] == pytest.approx(tiny["batch_size"] * tiny["seq_len"] / tiny["step_s"])
  assert "peak_device_memory_bytes" in tiny  # None on CPU, bytes where the backend keeps memory stats
  assert math.isfinite(tiny["final_loss"])


@pytest.mark.slow
def test_benchmark_lisa_tiny(tmp_path):
  """A LISA-layout folder, its import and two sharded exports, each in its own process (≈1 min on 2 cores)."""
  pytest.importorskip("torch")
  if not os.path.exists(benchmark_lisa.TIME):
    pytest.skip(f"needs {benchmark_lisa.TIME} (GNU time)")
  out = tmp_path / "lisa.json"
  benchmark_lisa.main(["--size", "tiny", "--max-shard-size", "50KB", "--workdir", str(tmp_path / "work"),
                       "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["config"] == "configs/lisa.py:tiny" and report["num_params"] > 0
  assert report["model_bytes"] == 4 * report["num_params"]  # float32 params
  written = report["lisa_checkpoint"]
  assert "pytorch_model.bin.index.json" in written["files"] and written["num_tensors"] > 0
  index = json.loads((tmp_path / "work" / "LISA-tiny" / "pytorch_model.bin.index.json").read_text())
  assert sorted(set(index["weight_map"].values())) == [f for f in written["files"] if f.endswith(".bin")]
  for step in (report["overhead"], report["import"]):
    assert _positive(step["seconds"]) and _positive(step["peak_rss_bytes"])
  assert report["import"]["num_imported_tensors"] > 0
  assert [e["dtype"] for e in report["exports"]] == ["float32", "bfloat16"]
  for export in report["exports"]:
    assert _positive(export["seconds"]) and _positive(export["peak_rss_bytes"])
    assert export["ratio_to_model_bytes"] == pytest.approx(export["peak_rss_bytes"] / report["model_bytes"])
    assert export["bound_bytes"] == (report["model_bytes"] + export["max_shard_bytes"]
                                     + report["overhead"]["peak_rss_bytes"])
    # 50 KB shards: the LLM export is sharded, and its index names every shard the folder holds.
    llm = tmp_path / "work" / f"export_tiny_{export['dtype']}" / "llm"
    assert export["llm_index"] == "model.safetensors.index.json" and len(export["llm_shards"]) > 1
    named = set(json.loads((llm / export["llm_index"]).read_text())["weight_map"].values())
    assert named == set(export["llm_shards"]) == {p.name for p in llm.glob("*.safetensors")}


def test_benchmark_decode_layers_tiny(tmp_path, capsys):
  out = tmp_path / "decode.json"
  assert benchmark_decode_layers.main(["--size", "tiny", "--new-tokens", "4", "--repeats", "1",
                                       "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["tokens_equal"] and result["new_tokens"] == 4
  for row in result["modes"].values():
    assert row["total_s"] > 0 and row["first_token_s"] > 0
  assert result["config"]["num_layers"] == 2
  # A request the decoder cannot hold is named, not run.
  assert benchmark_decode_layers.main(["--size", "tiny", "--new-tokens", "40", "--out", str(out)]) == 2
  assert "--new-tokens 40 does not fit" in capsys.readouterr().err


def test_a_bad_option_is_a_short_message_from_the_command_line(tmp_path):
  import subprocess
  import sys

  script = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark_model.py")
  result = subprocess.run([sys.executable, script, "--out", str(tmp_path / "x.json"), "--batch-sizes", "huge=4"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == ("benchmark_model.py: error: --batch-sizes entry 'huge=4': 'huge' is not a model "
                                   "size; expected one of ['1b', '7b', 'small', 'tiny']")
  assert not (tmp_path / "x.json").exists()
