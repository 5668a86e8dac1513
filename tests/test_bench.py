"""The benchmark script runs and reports every figure (its numbers are read, not asserted)."""

from __future__ import annotations

import torch

from model import bench
from model.bench import format_results, interleaved_medians, run
from model.checkpoint import DEFAULT_DIR


def test_bench_reports_every_figure_for_a_config_with_random_weights():
    results = run(str(DEFAULT_DIR), repeats=1, ks=(1, 2), config="roi-test")
    assert results["model"] == "roi-test (random weights)"
    assert [row["k"] for row in results["boxes"]] == [1, 2]
    assert all(row["engine_s"] > 0 and row["naive_s"] > 0 for row in results["boxes"])
    assert results["interactive"]["ratio"] > 0
    files = results["interactive_files"]
    assert len(files) == 2 and files[1]["size"] == [1280, 960]  # the scene's own size, then a photo's
    assert all(row["ratio"] > 0 and row["warm_decoded_s"] > 0 for row in files)
    assert results["interactive_full"]["ratio"] > 0
    assert results["interactive_full_photo"]["ratio"] > 0 and results["interactive_full_photo"]["size"] == [
        1280,
        960,
    ]
    assert [row["batch"] for row in results["decode"]] == [1, 16]
    assert all(row["tokens_per_s"] > 0 and row["step_ms"] > 0 for row in results["decode"])
    assert results["decode"][0]["bandwidth_bound_tokens_per_s"] > 0  # batch 1: bandwidth-bound
    text = format_results(results)
    assert "interactive new box" in text and "from a 1280x960 JPEG file" in text and "peak RSS" in text
    assert "(1280x960 JPEG): warm" in text and "bandwidth bound" in text
    assert "question positions computed" in text  # the lean steps ask through the question tree
    photo = results["interactive_full_photo"]
    assert photo["warm_floor_s"] > 0 and 0 < photo["ratio_floor"] <= 1 and "floor of warm" in text
    assert results["dtype"] == "float32" and "weights: float32" in text


def test_bench_measures_bf16_weights_against_a_bf16_peak(monkeypatch):
    peak_dtypes = []
    measure = bench.matmul_flops

    def recorded(*args, **kwargs):
        peak_dtypes.append(kwargs.get("dtype"))
        return measure(*args, **kwargs)

    monkeypatch.setattr(bench, "matmul_flops", recorded)
    results = run(str(DEFAULT_DIR), repeats=1, ks=(1,), config="roi-test", dtype=torch.bfloat16)
    assert results["dtype"] == "bfloat16" and results["matmul_gflops"] > 0
    assert peak_dtypes == [torch.bfloat16]
    assert all(row["tokens_per_s"] > 0 for row in results["decode"])


def test_interleaved_medians_time_every_variant_each_repeat():
    order: list[str] = []
    medians = interleaved_medians({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b"] * 3 and set(medians) == {"a", "b"}
