"""The training-step benchmark runs end to end and reports consistent results (benchmarks/bench_train.py)."""

import ctypes.util
import io
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_train  # noqa: E402
import workers  # noqa: E402


def test_ratio_is_the_median_of_the_per_round_ratios():
    """Not the ratio of the medians: the rounds pair each row's step with timm's of the same minutes."""
    ready = {label: {"path": "p", "optimizer": "o", "params": 10, "onednn": True,
                     "cases": {"64": {"first_step_s": 1.0, "losses": [2.0, 1.0], "max_weight_change": 0.1}}}
             for label in ("convnext_zoo tf", "timm eager")}
    times = {("convnext_zoo tf", 64): {0: 1.0, 1: 2.0, 2: 4.0, 3: 1.0},
             ("timm eager", 64): {0: 2.0, 1: 2.0, 2: 2.0}}  # round 3 lost: not paired
    rows = {r["framework"]: r for r in bench_train.rows_of("v2_atto", 8, ready, times)}
    tf = rows["convnext_zoo tf"]
    assert tf["turn_ratios"] == [2.0, 1.0, 0.5]
    assert tf["vs_timm_eager"] == 1.0
    assert tf["images_per_s"] == pytest.approx(8 / 1.5)  # median of its four steps
    assert tf["images_per_s"] / rows["timm eager"]["images_per_s"] != tf["vs_timm_eager"]
    assert (tf["images_per_s_q1"], tf["images_per_s_q3"]) == pytest.approx((3.5, 8.0))
    assert rows["timm eager"]["vs_timm_eager"] == 1.0


def test_serve_answers_turns_until_quit_and_rejects_other_requests():
    out = io.StringIO()
    seen = []
    workers.serve({"a": 1}, lambda key, count: seen.append((key, count)) or [0.25] * count,
                  ["RUN 64 32 2\n", "QUIT\n", "RUN 64 32 1\n"], out)
    assert out.getvalue() == 'READY {"a": 1}\nTIME 0.25 0.25\n'
    assert seen == [("64 32", 2)]
    with pytest.raises(ValueError, match=r"Received: 'STEP 64'\. Accepted: 'RUN <key words> <count>'"):
        workers.serve({}, lambda key, count: [], ["STEP 64\n"], io.StringIO())


def test_alternate_measures_every_name_each_round_in_turned_order():
    order = []
    results = workers.alternate(lambda name: order.append(name) or len(order), ["a", "b", "c"], 3)
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert results == {"a": [1, 6, 7], "b": [2, 5, 8], "c": [3, 4, 9]}
    assert list(results) == ["a", "b", "c"]


@pytest.mark.parametrize("args, message", [
    (["--frameworks", "tf,jax"], "timm included (the reference). Received: 'tf,jax'"),
    (["--frameworks", "tf,caffe,timm"], "Received: 'tf,caffe,timm'"),
    (["--models", "tiny"], "--models takes names like v2_atto or v1_tiny. Received: 'tiny'"),
    (["--image-sizes", "224,big"], "--image-sizes takes a comma list of pixel sizes such as 224,64. "
                                   "Received: '224,big'"),
    (["--image-sizes", "16"], "--image-sizes must be at least 32"),
    (["--repeats", "0"], "--repeats must be at least 1. Received: 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1. Received: 0"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, args, message):
    proc = subprocess.run([sys.executable, SCRIPT, "--output-dir", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_allocator_env_preloads_jemalloc_for_every_worker_or_says_how_to_get_it():
    assert bench_train.allocator_env("default") == {}
    env = bench_train.allocator_env("jemalloc", find=lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    assert env == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    with pytest.raises(ValueError, match="apt-get install libjemalloc2.*--allocator default"):
        bench_train.allocator_env("jemalloc", find=lambda name: None)


def test_workers_read_the_allocator_the_process_runs_not_its_environment():
    """A preload the loader cannot open leaves the C library's allocator; one it opens is seen."""
    def run(preload):
        env = dict(os.environ, LD_PRELOAD=preload)
        proc = subprocess.run([sys.executable, "-c", "import workers; print(workers.allocator())"],
                              env=env, capture_output=True, text=True, timeout=60,
                              cwd=os.path.join(ROOT, "benchmarks"))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run("libjemalloc-absent.so.9") == "default"
    library = ctypes.util.find_library("jemalloc")
    if library:  # where it is installed (apt-get install libjemalloc2)
        assert run(library) == "jemalloc"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads Linux's /proc/cpuinfo")
def test_machine_facts_name_the_cpu_extensions_that_change_the_kernels():
    """AVX-512 (oneDNN on in TensorFlow) and its 16-bit extensions (oneDNN's float16 and bfloat16 kernels),
    each counted when the kernel lists it for every core."""
    with open("/proc/cpuinfo") as f:
        flags = set.intersection(*(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")))
    facts = workers.machine()
    assert facts["avx512"] == ("avx512f" in flags)
    for flag in ("avx512_vnni", "avx512_bf16", "avx512_fp16"):
        assert facts[flag] == (flag in flags), flag


def test_a_worker_on_another_allocator_than_asked_stops_the_run():
    ready = {"TF": {"allocator": "jemalloc"}, "timm eager": {"allocator": "default"}}
    with pytest.raises(RuntimeError, match=r"--allocator jemalloc.*'timm eager': 'default'.*ldconfig"):
        bench_train.check_allocators("jemalloc", ready)
    bench_train.check_allocators("jemalloc", {"TF": {"allocator": "jemalloc"}, "x": {"allocator": "unknown"}})
    with pytest.raises(RuntimeError, match="--allocator default"):
        bench_train.check_allocators("default", {"TF": {"allocator": "jemalloc"}})


def test_markdown_names_the_allocator():
    machine = {"cpu": "x", "cpu_count": 2, "avx512": False, "load_average_at_start": [0.0] * 3,
               "load_average_at_end": [0.0] * 3}
    out = {"command": "c", "started_utc": "t", "machine": machine, "versions": {}, "rows": [], "errors": [],
           "training": {"learning_rate": 1e-3, "weight_decay": 0.05, "loss": "l", "data": "d"},
           "settings": {"batch_size": 32, "threads": 2, "allocator": "jemalloc",
                        "allocator_env": bench_train.allocator_env("jemalloc", find=lambda name: "libj.so")}}
    header = bench_train.markdown(out).splitlines()[3]
    assert "allocator jemalloc (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1)" in header
    out["settings"].update(allocator="default", allocator_env={})
    assert bench_train.markdown(out).splitlines()[3].endswith("float32, allocator default  ")


@pytest.mark.slow  # about a minute: two worker processes, compiled training steps
def test_quick_run_times_learning_steps_of_tf_and_timm(tmp_path):
    """--quick end to end: TensorFlow and timm workers, V2 atto at 32 px, batch 2, two rounds."""
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--threads", "1", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "bench_train.json").read_text())
    text = (tmp_path / "bench_train.md").read_text()
    assert out["errors"] == []
    assert set(out["machine"]) >= {"cpu", "avx512", "cpu_count", "load_average_at_start"}
    assert set(out["versions"]) >= {"keras", "tensorflow", "torch", "timm"}
    rows = {r["framework"]: r for r in out["rows"]}
    assert set(rows) == {"convnext_zoo tf", "timm eager"}
    tf, timm = rows["convnext_zoo tf"], rows["timm eager"]
    assert tf["optimizer"] == "LayerDecayAdamW" and timm["optimizer"] == "torch.optim.AdamW"
    assert tf["path"] == "train_on_batch, jit_compile=False"  # Keras' default on a CPU
    assert tf["onednn"] in (True, False) and timm["onednn"] in (True, False)
    assert tf["params"] == timm["params"] == 3_708_400  # the same network (V2 atto, 1000 classes)
    for r in out["rows"]:
        assert (r["model"], r["image_size"], r["batch"]) == ("v2_atto", 32, 2)
        assert len(r["times_s"]) == 2 and r["rounds"] == [0, 1]
        assert r["images_per_s"] == pytest.approx(2 / statistics.median(r["times_s"]))
        assert r["images_per_s_q1"] <= r["images_per_s"] <= r["images_per_s_q3"]
        # Each worker's step learns: the weights move and the loss on the repeated batch falls.
        assert r["max_weight_change"] > 0
        assert r["warmup_losses"][-1] < r["warmup_losses"][0], r["warmup_losses"]
        assert f"| v2_atto | 32 | {r['framework']} | {r['path']} | {r['optimizer']} | " \
               f"{r['images_per_s']:.2f} | {r['images_per_s_iqr']:.2f} | {r['vs_timm_eager']:.2f}x | 2 |" in text
    assert tf["vs_timm_eager"] == pytest.approx(statistics.median(
        t / s for t, s in zip(timm["times_s"], tf["times_s"])))
    assert timm["vs_timm_eager"] == 1.0
