"""The benchmarks run (tiny sizes, no GPU, no stack) and end with the JSON summary they promise.

Their figures are not checked here: benchmarks live in bench/, not in the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *args: str, timeout_s: float = 300) -> tuple[list[str], dict[str, object]]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])


@pytest.mark.slow
def test_gpu_bls_check_dry_run_on_a_cpu(tmp_path: Path) -> None:
    """The device run's correctness script, on the CPU: the GPU model's code, as the verdict model and as the
    explain model, against the in-process scores."""
    output = tmp_path / "bls.txt"
    args = ["--device", "cpu", "--images", "4", "--check-images", "2", "--new-tokens", "4", "--skip-random"]
    lines, summary = _run("gpu_bls_check.py", *args, "--output", str(output))
    assert summary["failures"] == []
    passed = [line.split(":")[0] for line in lines if line.startswith("PASS")]
    assert len(passed) == 5 and any("late generation_logits refused" in p for p in passed)
    assert any("GPU BLS verdict model" in line for line in lines) and any(
        "GPU BLS explain model" in line for line in lines
    )


@pytest.mark.slow
def test_gpu_fakevlm_runs_tiny_on_a_cpu(tmp_path: Path) -> None:
    output = tmp_path / "gpu.txt"
    args = ["--tiny", "--verdict-batch", "1", "2", "--explain-batch", "2", "--new-tokens", "3"]
    lines, summary = _run("gpu_fakevlm.py", *args, "--repeat", "1", "--generate-repeat", "1", "--output", str(output))
    assert any(line.startswith("naive") for line in lines)  # the baseline is measured in the same run
    assert set(summary["verdict_img_s"]) == {"1", "2"}  # type: ignore[arg-type]
    assert set(summary["explain_vs_generate"]) == {"2"}  # type: ignore[arg-type]
    assert summary["targets_apply"] is False and summary["meets_targets"] is None
    assert output.read_text().strip().splitlines()[-1] == lines[-1]


@pytest.mark.slow
def test_preprocess_bench_reports_speedup_and_tolerance(tmp_path: Path) -> None:
    lines, summary = _run("preprocess.py", "--megapixels", "0.5", "--repeat", "1", "--output", str(tmp_path / "p.txt"))
    assert set(summary["speedup_by_case"]) == {"JPEG 0.5MP", "PNG 0.5MP"}  # type: ignore[arg-type]
    assert isinstance(summary["speedup"], float) and summary["within_tolerance"] is True
    assert lines[-2].startswith("PNG 0.5MP")  # one table row per case, baseline and candidate side by side


@pytest.mark.slow
def test_preprocess_drift_bench_scores_both_paths(tmp_path: Path) -> None:
    output = tmp_path / "drift.txt"
    lines, summary = _run("preprocess_drift.py", "--count", "8", "--max-mp", "1", "--output", str(output))
    by_case = summary["by_case"]
    assert set(by_case) == {"JPEG q95", "JPEG q85", "JPEG q70", "PNG", "JPEG", "all"}  # type: ignore[arg-type]
    assert summary["images"] == 8 and isinstance(summary["max_drift"], float) and isinstance(summary["flips"], int)
    assert 0.0 <= summary["max_drift"] <= 1.0 and summary["faithful"] is (  # type: ignore[operator]
        summary["max_drift"] <= 0.01 and summary["flips"] == 0  # type: ignore[operator]
    )
    assert any(line.startswith("# rule (issue 12.5)") for line in lines)
    assert output.read_text().strip().splitlines()[-1] == lines[-1]


def test_provenance_bench_runs_small() -> None:
    _, summary = _run("provenance.py", "--megapixels", "0.05", "--repeat", "1")
    results = summary["results"]
    assert isinstance(results, list) and len(results) == 8
    declared = {"iptc_xmp", "c2pa"}
    assert all(result["declares_ai"] == (result["case"] in declared) for result in results)
    assert all(result["ingredient_declares_ai"] == (result["case"] == "c2pa_composite") for result in results)


@pytest.mark.slow
def test_triton_gpu_dry_run_on_a_cpu(tmp_path: Path) -> None:
    """The prepared through-Triton run (bench/triton_gpu.py), its every step on the CPU: weights made, the
    in-process baseline, tritonserver started with the deployed models, the worker's detector at two
    concurrencies, 80%-of-peak latencies, latencies with explanations running."""
    output = tmp_path / "triton.txt"
    args = ["--tiny", "--device", "cpu", "--concurrency", "1", "4", "--explain-concurrency", "1", "--seconds", "2"]
    # Two Triton models load and the explain model generates at nice 10 on one thread: minutes on a busy CPU.
    lines, summary = _run("triton_gpu.py", *args, "--output", str(output), timeout_s=600)
    assert summary["bench"] == "triton_gpu" and set(summary["img_s"]) == {"1", "4"}
    assert summary["triton_img_s_peak"] > 0 and summary["in_process_img_s"] > 0 and summary["explain_img_s"] > 0
    assert summary["p99_ms_at_80pct"] >= summary["p50_ms_at_80pct"] > 0 and "targets_met" not in summary
    assert output.read_text().splitlines()[-1] == lines[-1] and output.with_suffix(".triton.log").exists()
