"""The deployment benchmark runs its four runtimes and writes consistent results (benchmarks/bench_deploy.py)."""

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_deploy.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_deploy  # noqa: E402


def test_ratio_is_timm_latency_over_the_runtime_latency_of_the_same_model():
    rows = [{"model": "v2_atto", "runtime": bench_deploy.REFERENCE, "latency_s": 0.03},
            {"model": "v2_atto", "runtime": "onnxruntime", "latency_s": 0.01},
            {"model": "v1_tiny", "runtime": bench_deploy.REFERENCE, "latency_s": 0.2},
            {"model": "v1_tiny", "runtime": "onnxruntime", "latency_s": 0.4},
            {"model": "v2_nano", "runtime": "onnxruntime", "latency_s": 0.1}]  # no timm row
    bench_deploy.ratios(rows)
    assert [r["vs_timm"] for r in rows] == [pytest.approx(1.0), pytest.approx(3.0), pytest.approx(1.0),
                                            pytest.approx(0.5), None]
    assert all(r["vs_timm_1_thread"] is None for r in rows)  # no one-thread row timed
    assert bench_deploy.target(rows) == {"met": False, "slower_than_timm": ["v1_tiny onnxruntime"]}
    assert bench_deploy.target(rows[:2])["met"] is True


@pytest.mark.slow  # a run of the script end to end: about a minute
def test_quick_run_writes_json_and_markdown(tmp_path):
    """V2 atto at 64 px, one turn per runtime: files, parity, ratios and machine records."""
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--output-dir", str(tmp_path / "out"),
                           "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "bench_deploy.json").read_text())
    text = (tmp_path / "out" / "bench_deploy.md").read_text()
    assert out["errors"] == [], out["errors"]
    assert proc.stdout.rstrip().endswith(text.rstrip())  # the markdown is printed last

    names = [name for name, _ in bench_deploy.RUNTIMES.values()]
    assert [r["runtime"] for r in out["rows"]] == names
    assert {r["model"] for r in out["rows"]} == {"v2_atto"}
    by_name = {r["runtime"]: r for r in out["rows"]}
    timm, one = by_name[bench_deploy.REFERENCE], by_name[bench_deploy.ONE_THREAD]
    for row in out["rows"]:
        assert row["latency_s"] == pytest.approx(statistics.median(row["times_s"]))
        assert row["vs_timm"] == pytest.approx(timm["latency_s"] / row["latency_s"])
        assert row["vs_timm_1_thread"] == pytest.approx(one["latency_s"] / row["latency_s"])
        # float32 everywhere: every runtime agrees with the Keras model (timm through the same weights).
        assert row["relative_error"] <= 1e-4 and row["top1_agreement"] == 1.0, row
        assert f"| v2_atto | {row['runtime']} |" in text
        assert f"| {row['vs_timm']:.2f}x | {row['vs_timm_1_thread']:.2f}x |" in text
    exports = out["exports"]["v2_atto"]
    assert by_name["LiteRT interpreter (XNNPACK)"]["file_bytes"] == exports["litert"]["bytes"] \
        == os.path.getsize(tmp_path / "work" / "v2_atto" / "model.tflite")
    assert by_name["onnxruntime"]["file_bytes"] == os.path.getsize(tmp_path / "work" / "v2_atto" / "model.onnx")
    assert exports["litert"]["input_shape"] == [1, 64, 64, 3]
    assert by_name["openvino_function"]["file_bytes"] is None
    exported = [r for r in out["rows"] if not r["runtime"].startswith("timm")]
    assert out["target"]["met"] == all(r["vs_timm"] >= 1 for r in exported)

    machine = out["machine"]
    assert isinstance(machine["avx512"], bool) and machine["cpu"]
    assert len(machine["load_average_at_start"]) == 3 and len(machine["load_average_at_end"]) == 3
    assert out["onednn"] in (True, False, None)
    assert all(out["versions"][p] for p in ("tensorflow", "ai-edge-litert", "onnxruntime", "openvino",
                                              "torch", "timm"))
    assert "AVX-512 " in text and "oneDNN " in text and "Load average" in text
