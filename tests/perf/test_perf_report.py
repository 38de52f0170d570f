"""tools/perf_report.py: the README's issue-5 target table is computed from the benchmark JSON, not written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def point(context, budget, tok_s, bytes_per_token, bw, resident, compression=None):
    p = {"context": context, "budget": budget, "tokens_per_second": tok_s, "seconds_per_token": 1 / tok_s,
         "bytes_per_token": bytes_per_token, "fraction_of_bandwidth_bound": bw, "cache_resident_bytes": resident,
         "first_step_seconds": 30.0, "new_graphs_during_timed_runs": 0}
    if compression is not None:
        p["compression_fraction_of_step"] = compression
    return p


@pytest.fixture
def report(tmp_path, monkeypatch):
    import bench_common
    import perf_report

    monkeypatch.setattr(bench_common, "RESULTS", tmp_path)
    machine = {"cpu": "test cpu", "torch_threads": 2, "memory_gib": 1, "torch": "x", "python": "y"}
    points = {
        "8192/full": point(8192, "full", 10.0, 600, 0.4, 1000),
        "8192/0.1": point(8192, "0.1", 14.0, 300, 0.3, 110, 0.05),
        "16384/full": point(16384, "full", 5.0, 900, 0.55, 2000),
        "16384/0.1": point(16384, "0.1", 11.0, 320, 0.6, 210, 0.12),
    }
    fp32_points = {"4096/full": point(4096, "full", 8.0, 1e8, 0.8, 500), "4096/0.1": point(4096, "0.1", 9.0, 5e7, 0.45, 50)}
    (tmp_path / "decode_M_float32.json").write_text(json.dumps(
        {"model": "M", "dtype": "float32", "machine": machine, "copy_bandwidth_bytes_per_s": 1e9,
         "points": fp32_points}))
    (tmp_path / "decode_M_bfloat16.json").write_text(json.dumps(
        {"model": "M", "dtype": "bfloat16", "machine": machine, "copy_bandwidth_bytes_per_s": 1e9, "points": points}))
    (tmp_path / "peers.json").write_text(json.dumps({"results": [
        {"model": "M", "dtype": "float32", "prompt_tokens": 4096, "full_speedup_vs_transformers": 1.6,
         "full_target_met": True, "budget_speedup_vs_kvpress": 1.2, "budget_target_met": False,
         "budget": 0.1, "kvpress_press": "snapkv",
         "engines": {"transformers_full": {"decode_tokens_per_second": 5.0},
                     "kvpress_snapkv_0.1": {"decode_tokens_per_second": 16.0}}}]}))
    (tmp_path / "decode_attention.json").write_text(json.dumps({"rows": [
        {"model_shapes": "M", "dtype": "float32", "capacity": 16, "flex_over_sdpa": 1.3, "flex_us": 13.0,
         "sdpa_additive_bias_us": 10.0, "packed_us": 8.0},
        {"model_shapes": "M", "dtype": "bfloat16", "capacity": 32, "flex_over_sdpa": 1.05, "flex_us": 21.0,
         "sdpa_additive_bias_us": 20.0, "packed_us": 25.0, "sdpa_kernel_us": 23.0, "decode_kernel": "sdpa",
         "decode_us": 23.0}]}))
    return perf_report


def test_target_rows_compare_each_measurement_with_its_target(report):
    rows = {(target, where): (measured, verdict) for target, where, measured, verdict in report.target_rows()}
    assert rows[("1. 10% / full >= 1.5x at 8k", "M bfloat16")] == ("1.40x (bytes ratio 2.00x)", "**missed**")
    assert rows[("1. 10% / full >= 2.0x at 16k", "M bfloat16")] == ("2.20x (bytes ratio 2.81x)", "met")
    assert rows[("3. >= 50% of the (copy) bandwidth bound at 16k", "M bfloat16 full")] == ("55%", "met")
    assert rows[("4. compression <= 10% of the step (10%, 16k)", "M bfloat16")] == ("12.0%", "**missed**")
    assert rows[("5. cache bytes at 10% <= 12% of full (16k)", "M bfloat16")] == ("10.5%", "met")
    # ceilings: 1e9 B/s / 1e8 B per token = 10 tok/s over transformers' 5; 1e9 / 5e7 = 20 over kvpress' 16
    assert rows[("2. keepkv full >= 1.5x transformers", "M float32 4k")] == ("1.60x (ceiling 2.00x)", "met")
    assert rows[("2. keepkv 10% >= 1.5x kvpress 10%", "M float32 4k")] == ("1.20x (ceiling 1.25x)", "**missed**")
    assert rows[("7. flex <= 1.1x SDPA + bias (decode)", "worst case: float32, 16 slots")] == ("1.30x", "**missed**")
    # the kernel the decode runs is judged: SDPA at 32 bf16 slots (23 / 20 us), not the slower packed (25 / 20)
    assert rows[("7. keepkv's decode kernel (packed or SDPA, by dtype and size) <= 1.1x SDPA + bias",
                 "worst case: M bfloat16, 32 slots (sdpa)")] == ("1.15x", "**missed**")


def test_render_puts_the_target_table_first(report):
    text = report.render()
    assert text.index("Issue-5 targets") < text.index("| model | dtype | context |")
    assert "| 1. 10% / full >= 1.5x at 8k | M bfloat16 | 1.40x (bytes ratio 2.00x) | **missed** |" in text
