"""`scripts/benchmark_vs_torch.py` on shrunken sizes: the report's shape, parity figures and the Markdown block."""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from scripts import benchmark_vs_torch  # noqa: E402
from unires_jax import perf  # noqa: E402
from unires_jax.models import llm  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture
def tiny_preset(monkeypatch):
  small = benchmark_vs_torch.PRESETS["small"]
  tiny = dict(small, llama=llm.LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                           head_dim=8, mlp_dim=48, max_seq_len=32, remat_policy="none"),
              prompt_len=12, new_tokens=4, grid=8,
              mask_decoder=dataclasses.replace(small["mask_decoder"], transformer_dim=32, mlp_dim=64,
                                               iou_head_hidden_dim=32))
  monkeypatch.setitem(benchmark_vs_torch.PRESETS, "small", tiny)


def test_report_rows_parity_and_markdown(tmp_path, tiny_preset):
  out, md = tmp_path / "vs_torch.json", tmp_path / "benchmarks.md"
  md.write_text("# Benchmarks\n\nkept text\n")
  benchmark_vs_torch.main(["--modules", "llama,decode,mask_decoder", "--repeats", "1", "--out", str(out),
                           "--markdown", str(md)])
  report = json.loads(out.read_text())
  rows = {row["module"]: row for row in report["rows"]}
  assert set(rows) == {"LLaMA → logits", "greedy decode", "SAM mask decoder"}
  assert rows["LLaMA → logits"]["max_abs_diff"] < 1e-4
  assert rows["SAM mask decoder"]["max_abs_diff"] < 1e-4
  decode = rows["greedy decode"]
  assert decode["tokens_equal"] == decode["tokens"] == 4  # the same greedy tokens as HF generate
  for row in rows.values():
    assert row["speed_vs_torch"] == pytest.approx(row["torch_s"] / row["jax_s"])
    assert row["jax_compile_s"] > 0 and len(row["jax_s_all"]) == len(row["torch_s_all"]) == 1
  assert rows["LLaMA → logits"]["flops"] > 0 and 0 < rows["LLaMA → logits"]["jax_flops_share"]
  assert decode["jax_flops_share"] is None and "jax_per_token_s" in decode
  assert len(report["load_average_before"]) == 3 and report["torch_threads"] == 2
  text = md.read_text()
  assert "kept text" in text and text.count(benchmark_vs_torch.MARKER_BEGIN) == 1
  assert report["machine"] == perf.cpu_description() and f" on {report['machine']}, " in text  # the CPU it ran on
  assert "| greedy decode |" in text and "4/4 tokens equal" in text
  # A second run replaces the block instead of adding one.
  benchmark_vs_torch.main(["--modules", "llama", "--repeats", "1", "--out", str(out), "--markdown", str(md)])
  text = md.read_text()
  assert text.count(benchmark_vs_torch.MARKER_BEGIN) == 1 and "| greedy decode |" not in text


def test_unknown_module_is_a_usage_error(tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    benchmark_vs_torch.main(["--modules", "resnet", "--out", str(tmp_path / "x.json")])
  assert exit_info.value.code == 2
