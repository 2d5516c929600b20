"""The folder-scoring benchmark runs both paths and writes consistent results (benchmarks/bench_predict.py)."""

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_predict.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_predict  # noqa: E402


def test_quick_run_writes_json_and_markdown(tmp_path):
    """V2 atto at 64 px, 8 photographs, one turn per path: files, ratio, agreement, machine records."""
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--output-dir", str(tmp_path / "out"),
                           "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "bench_predict.json").read_text())
    text = (tmp_path / "out" / "bench_predict.md").read_text()
    assert out["errors"] == [] and text in proc.stdout
    assert [(r["model"], r["path"]) for r in out["rows"]] == [
        ("v2_atto", bench_predict.STREAMING), ("v2_atto", bench_predict.IN_MEMORY)]
    streaming, memory = out["rows"]
    for row in out["rows"]:
        assert row["images"] == 8 and len(row["times_s"]) == 1
        assert row["median_s"] == pytest.approx(statistics.median(row["times_s"]))
        assert row["images_per_s"] == pytest.approx(8 / row["median_s"])
        assert f"| v2_atto | {row['path']} | {row['images_per_s']:.1f} |" in text
    assert streaming["vs_in_memory"] == pytest.approx(streaming["images_per_s"] / memory["images_per_s"])
    # Both paths give the same top-1 class and probability (same transform, same weights).
    assert out["parity"]["v2_atto"]["top1_agreement"] == 1.0
    assert out["parity"]["v2_atto"]["max_probability_difference"] < 1e-5
    assert set(out["machine"]) >= {"cpu", "avx512", "cpu_count", "load_average_at_start"}
    assert out["onednn"] in (True, False, None) and "oneDNN" in text and "AVX-512" in text
    # The same 8 photographs, in the listing order, went through the streaming path.
    lines = (tmp_path / "work" / "v2_atto.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["predictions"] for line in lines)
