"""The GPU benchmark runs on a CPU with --quick and writes consistent results (benchmarks/bench_gpu.py)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_gpu.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_gpu  # noqa: E402


def test_ratios_divide_by_timm_of_the_same_model_task_and_batch():
    def row(framework, model, task, rate):
        return {"framework": framework, "model": model, "task": task, "batch": 1, "images_per_s": rate}

    rows = [
        row("convnext_zoo jax", "v2_atto", "inference", 30.0),
        row("timm torch.compile", "v2_atto", "inference", 20.0),
        row("convnext_zoo jax", "v2_atto", "training", 5.0),
        row("timm torch.compile", "v2_atto", "training", 10.0),
        row("convnext_zoo jax", "v1_tiny", "inference", 7.0),  # no timm row: no ratio
    ]
    bench_gpu._ratios(rows)
    assert [r["vs_timm"] for r in rows] == [1.5, 1.0, 0.5, 1.0, None]


@pytest.mark.slow  # a run of the script end to end: about 40 s
def test_quick_run_writes_json_and_markdown(tmp_path):
    # --max-seconds leaves room for a loaded machine; alone it takes about 40 s.
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--max-seconds", "240", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "bench_gpu.json").read_text())
    text = (tmp_path / "bench_gpu.md").read_text()
    assert out["errors"] == []
    assert out["reference"] == "timm eager"
    assert out["settings"]["image_size"] == 64
    assert set(out["versions"]) >= {"keras", "jax", "torch", "timm"}
    cases = {(r["framework"], r["model"], r["task"], r["batch"]) for r in out["rows"]}
    assert cases == {(fw, "v2_atto", task, 2) for fw in ("convnext_zoo jax", "timm eager")
                     for task in ("inference", "training")}
    timm = {r["task"]: r for r in out["rows"] if r["framework"] == "timm eager"}
    for r in out["rows"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds_per_call"])
        assert r["vs_timm"] == pytest.approx(r["images_per_s"] / timm[r["task"]]["images_per_s"])
        assert r["calls_per_turn"] >= 1 and len(r["turn_seconds_per_call"]) == 1
        assert (f"| v2_atto | {r['task']} | 2 | {r['framework']} | {r['seconds_per_call'] * 1e3:.2f} | "
                f"{r['images_per_s']:.1f} | {r['vs_timm']:.2f}x |") in text
    for device in out["devices"].values():
        assert device["platform"] == "cpu"
    # The markdown table is the last thing printed.
    assert proc.stdout.rstrip().endswith(text.rstrip().splitlines()[-1])
