"""The CPU benchmark script runs and writes its results (benchmarks/bench_cpu.py)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_cpu.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_cpu  # noqa: E402
import profile_ops  # noqa: E402


def _run(tmp_path, *args, timeout=600):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench_cpu.json") as f:
        return json.load(f)


def _fake_results(**parts):
    """A results dict as `bench_cpu.run` makes, around the given tables."""
    return {"command": "x", "started_utc": "t", "machine": {"platform": "p", "cpu_count": 2,
            "load_average_at_start": (0.0, 0.0, 0.0)}, "settings": {"threads": 2, "image_size": 224},
            "versions": {}, "errors": [], **parts}


def test_ratios_and_markdown_from_fake_rows():
    rows = [
        {"framework": bench_cpu.OURS_FAST, "model": "v1_tiny", "batch": 1, "latency_s": 0.1,
         "images_per_s": 10.0, "fraction_of_matmul_peak": 0.5},
        {"framework": "timm eager", "model": "v1_tiny", "batch": 1, "latency_s": 0.2,
         "images_per_s": 5.0, "fraction_of_matmul_peak": 0.25, "first_call_s": 3.21},
    ]
    bench_cpu._ratios(rows)
    assert rows[0]["speedup_vs"] == {"timm eager": 2.0}
    text = bench_cpu.markdown(_fake_results(throughput=rows))
    assert "| v1_tiny | convnext_zoo tf inference_function | 1 | 100.0 | 10.00 | 50% | 2.00x |" in text
    assert "| v1_tiny | timm eager | 1 | 200.0 | 5.00 | 25% |  |  |  | 3.2 |" in text


def test_peak_fractions_divide_by_the_peak_timed_alongside():
    """A row's share of the peak uses the median timed in its own turns; the start's best is kept apart."""
    gflop = bench_cpu.gflop_per_image("v1_tiny", 224)
    rows = [{"framework": bench_cpu.OURS_OPENVINO, "model": "v1_tiny", "batch": 16, "latency_s": 1.0,
             "images_per_s": 100 / gflop, "matmul_peak_gflops": 200.0},
            {"framework": "timm eager", "model": "v1_tiny", "batch": 1, "latency_s": 1.0,
             "images_per_s": 30 / gflop, "matmul_peak_gflops": None}]
    bench_cpu._rates(rows, 224, start_peak=250.0)
    assert rows[0]["gflops_per_s"] == pytest.approx(100.0)
    assert rows[0]["fraction_of_matmul_peak"] == pytest.approx(0.5)
    assert rows[0]["fraction_of_start_peak"] == pytest.approx(0.4)
    assert rows[1]["fraction_of_matmul_peak"] is None  # no peak timed in that run's turns
    assert rows[1]["fraction_of_start_peak"] == pytest.approx(0.12)
    matmul = {"n": 2048, "peak_gflops": 250.0, "numpy_gflops": 240.0, "torch_gflops": 250.0,
              "tensorflow_gflops": 230.0, "library": "torch",
              "during_turns": [{"model": "v1_tiny", "batch": 16, "gflops": 200.0, "times_s": [0.1]}]}
    text = bench_cpu.markdown(_fake_results(matmul=matmul, throughput=rows))
    assert "best of a few products at the start: 250.0 GFLOP/s" in text
    assert "The same torch product, timed as one more case in every model's turns (median GFLOP/s): " \
           "v1_tiny b16 200.0." in text
    assert "| v1_tiny | convnext_zoo tf openvino_function | 16 | 1000.0 | " in text
    assert re.search(r"\| v1_tiny \| convnext_zoo tf openvino_function \| 16 \| 1000.0 \| [\d.]+ \| 50% \|", text)


@pytest.mark.parametrize("library", bench_cpu.MATMUL_LIBRARIES)
def test_matmul_call_multiplies_in_each_library(library):
    product = np.asarray(bench_cpu.matmul_call(library, 64)())  # this process's thread pools as they are
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64), dtype=np.float32)
    b = rng.standard_normal((64, 64), dtype=np.float32)
    np.testing.assert_allclose(product, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


def test_matmul_call_rejects_an_unknown_library():
    with pytest.raises(ValueError, match=r"Received: 'blas'\. Accepted: \('numpy', 'torch', 'tensorflow'\)"):
        bench_cpu.matmul_call("blas", 8)


def test_thread_settings_hand_xla_only_flags(monkeypatch):
    # XLA stops reading XLA_FLAGS at the first word without "--": a flag behind such a word is lost.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    bench_cpu._set_thread_env(3)
    words = os.environ["XLA_FLAGS"].split()
    assert words[0] == "--xla_dump_to=/tmp/x" and "--xla_cpu_multi_thread_eigen=true" in words
    assert all(word.startswith("--") for word in words), words
    assert os.environ["OMP_NUM_THREADS"] == os.environ["TF_NUM_INTRAOP_THREADS"] == "3"


def test_the_test_workers_hand_xla_only_flags():
    # Set by tests/conftest.py for every test process (one thread per xdist worker).
    assert all(word.startswith("--") for word in os.environ.get("XLA_FLAGS", "").split()), os.environ["XLA_FLAGS"]


def test_cold_start_phases_are_disjoint_and_tabled():
    split = bench_cpu._phase_split(
        {"backbone graph": 0.2, "classifier head": 0.1, "assign": 0.5, "copy into variables": 0.3}, 1.0)
    assert split == pytest.approx({"backbone graph": 0.2, "classifier head and compile": 0.1,
                                   "read": 0.2, "copy into variables": 0.3, "rest": 0.2})
    row = {"model": "v1_tiny", "label": "from_preset, timm dir", "seconds": 1.0, "time_vs_timm": 1.5,
           "peak_above_baseline_bytes": 2**20, "peak_over_weights": 1.2, "phases_s": split}
    text = bench_cpu.markdown(_fake_results(cold_start=[row]))
    assert "| v1_tiny | from_preset, timm dir | 0.20 | 0.10 | 0.20 | 0.30 | 0.20 |" in text


def test_timed_phases_wrap_the_loading_functions_and_keep_their_signatures(tmp_path, monkeypatch):
    import inspect

    import numpy as np

    from convnext_zoo import backbone, create_convnext_v1, internals, weights

    for _, target, attribute in bench_cpu.phase_targets():
        monkeypatch.setattr(target, attribute, getattr(target, attribute))  # restored afterwards
    source = create_convnext_v1("tiny", num_classes=3, input_shape=(32, 32, 3))
    weights.save_weights(source, str(tmp_path / "model.safetensors"))
    signature = inspect.signature(backbone.ConvNeXtBackbone.__init__)
    totals = bench_cpu._timed_phases()
    # Keras reads constructor signatures (get_config): the wrappers keep them.
    assert inspect.signature(backbone.ConvNeXtBackbone.__init__) == signature
    with internals.weights_to_be_loaded():
        model = create_convnext_v1("tiny", num_classes=3, input_shape=(32, 32, 3))
    weights.load_weights(model, str(tmp_path / "model.safetensors"))
    assert all(totals[phase] > 0 for phase in bench_cpu.PHASES), totals
    assert totals["assign"] > totals["copy into variables"]
    for loaded, expected in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(loaded, expected)


@pytest.mark.slow  # a run of the script end to end: about a minute
def test_tiny_run_of_tensorflow_and_openvino_paths(tmp_path):
    """Two TF subprocesses and the matmul peak's, atto at 64 px: the script end to end in about a minute."""
    out = _run(tmp_path, "--quick", "--frameworks", "tf,openvino", "--batch-sizes", "1", "--image-size", "64",
               "--no-cold-start", "--repeats", "2", "--burst", "1", "--warmup", "1")
    assert out["errors"] == []
    from convnext_zoo import internals

    # The machine facts every figure needs: CPU, AVX-512, and TensorFlow's own oneDNN answer.
    machine = out["machine"]
    with open("/proc/cpuinfo") as f:
        assert machine["avx512"] == ("avx512f" in f.read().split())
    assert machine["cpu"] and machine["tensorflow_onednn"] == internals.onednn_enabled()
    with open(tmp_path / "bench_cpu.md") as f:
        state = {True: "on", False: "off"}[machine["tensorflow_onednn"]]
        assert f"TensorFlow oneDNN {state}" in f.read()
    names = {r["framework"] for r in out["throughput"]}
    assert names == {bench_cpu.OURS_PREDICT, bench_cpu.OURS_FAST, bench_cpu.OURS_OPENVINO}
    assert all(r["images_per_s"] > 0 and len(r["times_s"]) == 2 for r in out["throughput"])
    matmul = out["matmul"]
    assert matmul["peak_gflops"] == max(matmul[f"{lib}_gflops"] for lib in bench_cpu.MATMUL_LIBRARIES)
    assert matmul["peak_gflops"] == matmul[f"{matmul['library']}_gflops"]
    # The peak was timed in the same turns as the models, as often as each of them.
    [during] = matmul["during_turns"]
    assert (during["model"], during["batch"], len(during["times_s"])) == ("v2_atto", 1, 2)
    assert during["gflops"] == pytest.approx(2 * 2048**3 / np.median(during["times_s"]) / 1e9)
    for row in out["throughput"]:
        assert row["matmul_peak_gflops"] == during["gflops"]
        assert row["fraction_of_matmul_peak"] == pytest.approx(row["gflops_per_s"] / during["gflops"])
    assert (tmp_path / "bench_cpu.md").exists()


@pytest.mark.slow
def test_quick_mode(tmp_path):
    """`--quick` as documented: atto, TF, OpenVINO and timm, matmul peak, cold start of tiny."""
    out = _run(tmp_path, "--quick")
    assert out["errors"] == [], out["errors"]
    assert out["matmul"]["peak_gflops"] > 0
    assert {"timm eager", bench_cpu.OURS_FAST, bench_cpu.OURS_OPENVINO} <= {r["framework"] for r in out["throughput"]}
    assert len(out["cold_start"]) == 3
    for row in out["cold_start"]:
        phases = row["phases_s"]
        assert (phases == {}) == (row["kind"] == "timm")
        if phases:
            assert all(v > 0 for v in phases.values()), phases
            assert sum(phases.values()) == pytest.approx(row["seconds"])


def _profile(*args, **env):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2", **env)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "profile_ops.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )


def _section(stdout, title):
    """The lines of one profile: from its title line to the next blank line."""
    found = re.search(rf"^{re.escape(title)}:.*?(?=^$|\Z)", stdout, re.M | re.S)
    assert found, stdout
    return found.group(0)


def _onednn_state(stdout):
    """"on" or "off": whether the profiled children's TensorFlow ran oneDNN, as they printed it.

    The children ask their own TensorFlow (`convnext_zoo.internals.onednn_enabled`);
    "unknown" there means TensorFlow took away the private API it reads.
    """
    states = set(re.findall(r"^  oneDNN: (\w+)", stdout, re.M))
    assert len(states) == 1 and states <= {"on", "off"}, stdout
    return states.pop()


def _assert_mlp_kernels(stdout):
    """V2 atto's MLP matmuls, biases and exact GELUs as TensorFlow ran them, oneDNN on or off.

    On: each of the 25 matmuls (two per block, the head) is one
    `_MklNativeFusedMatMul` with its bias and GELU inside: no Erf. Off:
    TensorFlow's own `_FusedMatMul` with the bias inside, and the GELU's Erf
    as its own op in each of the 12 blocks (TensorFlow fuses a GELU into a
    CPU matmul only through oneDNN), and no oneDNN kernel but the library's
    layer norm. Either way the graph is the 2-D one: no batched matmul, no
    Erfc (the form of Keras' Dense GELU), no SquaredDifference (Keras'
    LayerNormalization), and GRN's norm is one EuclideanNorm kernel instead
    of Square, Sum and Sqrt.
    """
    profile = _section(stdout, "convnext_zoo TensorFlow inference_function")
    counts = {}
    for _, runs, kind in re.findall(r"^ +([\d.]+) ms +(\d+) x  (\S+)$", profile, re.M):
        counts[kind] = int(runs)
    assert "EuclideanNorm" in counts, profile
    forbidden = {"Erfc", "_MklMatMul", "MatMul", "BatchMatMulV2", "SquaredDifference", "Sqrt"}
    assert not counts.keys() & forbidden, profile
    if _onednn_state(stdout) == "on":
        assert counts.get("_MklNativeFusedMatMul") == 25, profile
        assert not counts.keys() & {"_FusedMatMul", "Erf"}, profile
    else:
        assert counts.get("_FusedMatMul") == 25 and counts.get("Erf") == 12, profile
        assert not {k for k in counts if k.startswith("_Mkl")} - {"_MklLayerNorm"}, profile


def test_profile_shows_gelu_fused_into_the_matmul():
    """On TensorFlow with oneDNN the MLP's bias and exact GELU run inside the matmul kernel.

    If the graph stopped matching oneDNN's fusion pattern, the profile would
    list the GELU's own element-wise ops (Erf / Erfc) next to a plain matmul.
    Without oneDNN (a CPU without AVX-512), TensorFlow's own fused matmul
    takes the bias and the Erf runs on its own (`_assert_mlp_kernels`;
    `test_profiles_follow_tensorflows_onednn_switch` forces both cases).
    """
    proc = _profile("--model", "v2_atto", "--image-size", "64", "--passes", "2", "--repeats", "3",
                    "--top", "40", "--framework", "tf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_mlp_kernels(proc.stdout)
    # The header: unprofiled wall time, then the profiled pass and the op
    # time inside it. Ops on the intra-op threads can overlap the calling
    # thread's, so their sum may pass the step a little (13.3 ms in a 13.1 ms
    # step, seen once); not dividing by the 2 passes would double it.
    header = re.search(r"([\d.]+) ms per call \(median of 3, not profiled\); profiled: "
                       r"([\d.]+) ms per forward pass, ([\d.]+) ms in ops", proc.stdout)
    assert header, proc.stdout
    wall, step, ops = (float(v) for v in header.groups())
    assert wall > 0 and 0 < ops <= 1.25 * step, proc.stdout


def _assert_onednn_primitives(stdout):
    """V2 atto's oneDNN primitives at 128 px where oneDNN is on; a plain "none" where it is off.

    On: every first MLP matmul (12 blocks, 4x the channels out) carries the
    exact GELU as a post-op, no second one does; the multiply-adds counted
    from the logged problem shapes (inner products and convolutions, grouped
    ones included) come to bench_cpu.py's count for the model; each rate is
    its line's FLOPs over its time per pass. Off: the profile says that
    TensorFlow runs without oneDNN and how to turn it on, and lists nothing.
    """
    title = "convnext_zoo TensorFlow inference_function, oneDNN primitives"
    profile = _section(stdout, title)
    assert "onednn_verbose" not in stdout  # the raw log stays out of the report
    if _onednn_state(stdout) == "off":
        assert profile.startswith(f"{title}: v2_atto: none to list.\n  oneDNN: off"), profile
        assert "TensorFlow runs its own kernels" in profile and "TF_ENABLE_ONEDNN_OPTS=1" in profile
        assert " x  " not in profile and "GFLOP" not in profile, profile
        return
    counted = re.search(r"matmul-like nodes: ([\d.]+) GFLOP per pass \(bench_cpu.py counts ([\d.]+)",
                        profile)
    assert counted, profile
    assert float(counted.group(1)) == pytest.approx(float(counted.group(2)), rel=0.05)
    matmuls = re.findall(r"([\d.]+) ms +(\d+) x  inner_product \[\S+\]( \+eltwise_gelu_erf)? "
                         r"mb(\d+)ic(\d+)oc(\d+) +([\d.]+) GFLOP/s", profile)
    assert matmuls, profile
    with_gelu = [m for m in matmuls if m[2]]
    assert sum(int(m[1]) for m in with_gelu) == 12, profile
    assert all(int(m[5]) == 4 * int(m[4]) for m in with_gelu), with_gelu
    assert sum(int(m[1]) for m in matmuls if not m[2]) == 12 + 1, profile  # second matmuls, head
    for ms, runs, _, mb, ic, oc, rate in matmuls:
        flops = 2 * int(mb) * int(ic) * int(oc) * int(runs)
        low, high = float(ms) - 0.005, float(ms) + 0.005  # the time is printed to 0.01 ms
        assert flops / high / 1e6 - 0.05 <= float(rate) <= flops / max(low, 1e-9) / 1e6 + 0.05, (ms, rate)


def test_onednn_profile_shows_each_primitive_with_its_fused_gelu():
    """oneDNN's own log of V2 atto's forward pass, through the script's front door.

    Where TensorFlow runs oneDNN, the primitives with the GELU fused into the
    first MLP matmuls; where it does not, a clear "none" (`_assert_onednn_primitives`).
    """
    proc = _profile("--model", "v2_atto", "--image-size", "128", "--passes", "2", "--repeats", "3",
                    "--top", "80", "--frameworks", "onednn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_onednn_primitives(proc.stdout)


@pytest.mark.parametrize("switch, state", [("0", "off"), ("1", "on")])
def test_profiles_follow_tensorflows_onednn_switch(switch, state):
    """Both branches of the two profile checks above, on any x86 CPU.

    `TF_ENABLE_ONEDNN_OPTS` turns oneDNN off on a CPU with AVX-512 and on
    on one without; the children report the setting's effect (which also
    fails loudly where `onednn_enabled` can no longer read it), and their
    kernels and primitives are the ones of that setting.
    """
    proc = _profile("--model", "v2_atto", "--image-size", "128", "--passes", "1", "--repeats", "1",
                    "--top", "80", "--frameworks", "tf,onednn", TF_ENABLE_ONEDNN_OPTS=switch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _onednn_state(proc.stdout) == state, proc.stdout
    assert f"  oneDNN: {state} (TF_ENABLE_ONEDNN_OPTS={switch})" in proc.stdout
    _assert_mlp_kernels(proc.stdout)
    _assert_onednn_primitives(proc.stdout)


def test_onednn_log_parsing_counts_grouped_convolutions():
    line = ("onednn_verbose,v1,primitive,exec,cpu,convolution,brdgmm_dw:avx512_core,forward_training,"
            "src:f32::blocked:acdb::f0 wei:f32:a:blocked:debcA16a::f0,attr-scratchpad:user,"
            "alg:convolution_direct,g96mb2_ic96oc96_ih56oh56kh7sh1dh0ph3_iw56ow56kw7sw1dw0pw3,0.5\n")
    fc = ("onednn_verbose,v1,primitive,exec,cpu,inner_product,x64:gemm:jit,forward_training,"
          "src:f32::blocked:ab::f0,attr-scratchpad:user attr-post-ops:eltwise_gelu_erf,,mb3136ic96oc384,1.25\n")
    created = fc.replace(",exec,", ",create:cache_miss,")
    groups = profile_ops.parse_onednn_verbose([line, line, fc, created, "other output\n"])
    conv = groups[("convolution", "brdgmm_dw:avx512_core", "", line.split(",")[-2])]
    assert conv == [2, 1.0, 2 * (2 * 2 * 96 * 56 * 56 * 1 * 7 * 7)]  # two runs, batch 2, one input channel per group
    assert groups[("inner_product", "x64:gemm:jit", "eltwise_gelu_erf", "mb3136ic96oc384")] == \
        [1, 1.25, 2 * 3136 * 96 * 384]
    assert len(groups) == 2  # the creation line and the other output are not runs


def test_openvino_profile_counts_the_models_matmul_work_and_rates_it():
    """OpenVINO's per-node profile of V2 atto, with GFLOP/s of its matmul-like nodes.

    The multiply-adds counted from the compiled nodes' shapes (fully
    connected, convolutions, the depthwise ones) must come to bench_cpu.py's
    count for the whole model: a wrong weight layout or group count in the
    FLOP formula would miss it by far more than the few norm and element-wise
    FLOPs that are not counted. Each rate is a node group's FLOPs over its
    time, and its share of a given peak is that rate over the peak.
    """
    proc = _profile("--model", "v2_atto", "--image-size", "128", "--passes", "2", "--repeats", "3",
                    "--top", "40", "--framework", "openvino", "--peak-gflops", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counted = re.search(r"matmul-like nodes: ([\d.]+) GFLOP per pass \(bench_cpu.py counts ([\d.]+)",
                        proc.stdout)
    assert counted, proc.stdout
    nodes, model = (float(v) for v in counted.groups())
    assert model == pytest.approx(2 * bench_cpu.GMACS_224["v2_atto"] * (128 / 224) ** 2, abs=0.01)
    assert nodes == pytest.approx(model, rel=0.05), proc.stdout
    rated = re.findall(r"([\d.]+) ms +(\d+) x  (\S+) \[\S+\] +([\d.]+) GFLOP/s \((\d+)% of peak\)",
                       proc.stdout)
    kinds = {kind for _, _, kind, _, _ in rated}
    assert {"FullyConnected", "GroupConvolution"} <= kinds, proc.stdout
    for _, _, _, gflops, percent in rated:
        assert int(percent) == pytest.approx(100 * float(gflops) / 50, abs=1)
    # GELU runs inside the fully connected kernels: no node of its own.
    assert not re.search(r"x  (Gelu|Erf)", proc.stdout), proc.stdout


def test_profile_names_an_unknown_framework():
    proc = _profile("--frameworks", "tf,caffe")
    assert proc.returncode == 2
    assert "tf, timm, openvino" in proc.stderr and "'tf,caffe'" in proc.stderr


def test_profile_layer_norm_forms_run_their_kernels_and_keep_the_outputs(rng, monkeypatch):
    """profile_ops.py's layer norm forms: their own kernels, the same outputs.

    With every weight random (the layer norm scales too), the network's
    outputs in each form match the library's to float32 round-off, and the
    traced graph holds the form's kernels: the library's 17 `_MklLayerNorm`
    for V2 atto's 17 layer norms, the portable form's 17 Squares, or neither
    outside the XLA clusters. Leaving the context restores the library.
    """
    import keras
    import tensorflow as tf

    import profile_ops
    from convnext_zoo import create_convnext_v2, inference_function, layers
    from tests.test_models import _randomize

    monkeypatch.setattr(layers, "FUSED_MIN_VALUES", 0)  # every layer norm of this small model
    model = create_convnext_v2("atto", num_classes=10, input_shape=(64, 64, 3))
    _randomize(model, rng)
    images = rng.standard_normal((2, 64, 64, 3)).astype("float32")

    def run():
        forward = inference_function(model)
        graph = forward.concrete_function.get_concrete_function(tf.TensorSpec(images.shape)).graph
        kinds = [op.type for op in graph.get_operations()]
        return keras.ops.convert_to_numpy(forward(images)), kinds

    library = (layers.PointwiseLayerNorm.call, layers.onednn_layer_norm_available)
    expected, kinds = run()
    assert layers.onednn_layer_norm_available(), "this TensorFlow has no oneDNN layer norm"
    assert kinds.count("_MklLayerNorm") == 17 and "Square" not in kinds
    for form, fused, squares in (("portable", 0, 17), ("xla", 0, 0)):
        with profile_ops.layer_norm_form(form):
            outputs, kinds = run()
        np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4, err_msg=form)
        assert kinds.count("Square") == squares, form
        assert kinds.count("_MklLayerNorm") == fused, form
    assert (layers.PointwiseLayerNorm.call, layers.onednn_layer_norm_available) == library
    with pytest.raises(ValueError, match="Received: 'fused'"):
        with profile_ops.layer_norm_form("fused"):
            pass


def test_profile_of_timm_runs_beside_the_tensorflow_one():
    """The timm child never imports TensorFlow (torch after TensorFlow crashes here)."""
    proc = _profile("--model", "v2_atto", "--image-size", "64", "--passes", "1", "--repeats", "2",
                    "--framework", "timm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timm eager: v2_atto" in proc.stdout and "x  aten::" in proc.stdout


def test_jax_profile_labels_xlas_thunks_with_their_layers():
    """`--frameworks jax`: the thunks XLA's CPU runtime ran, labelled "layer: op [thunk]".

    Every one of V2 atto's 12 blocks shows its MLP's first matmul, its
    depthwise sum and its layer norm; the conditional around each sum is no
    row of its own (its span holds its branch's thunks, counted already).
    """
    proc = _profile("--model", "v2_atto", "--image-size", "64", "--passes", "2", "--repeats", "3",
                    "--top", "200", "--frameworks", "jax")
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = _section(proc.stdout, "convnext_zoo JAX inference_function")
    wall, step, ops = map(float, re.search(
        r"([\d.]+) ms per call .*profiled: ([\d.]+) ms per forward pass, ([\d.]+) ms in ops", profile).groups())
    assert wall > 0 and step > 0 and ops > 0, profile
    rows = re.findall(r"^ +([\d.]+) ms +(\d+) x  (\w+): (\S+) \[(\S+)\]$", profile, re.M)
    assert len(rows) == len(profile.splitlines()) - 2, profile  # every row labelled
    runs = {}
    for _, count, layer, op, _ in rows:
        runs[layer, op] = runs.get((layer, op), 0) + int(count)
    assert runs.get(("mlp_fc1", "dot_general")) == 12, profile
    assert sum(n for (layer, _), n in runs.items() if layer == "conv_dw") >= 12, profile
    assert sum(n for (layer, _), n in runs.items() if layer == "norm") >= 12, profile
    assert not any(op == "cond" for _, op in runs), profile


@pytest.mark.parametrize("framework, title", [
    ("tf", "convnext_zoo TensorFlow train_on_batch, training step"),
    ("jax", "convnext_zoo JAX train_on_batch, training step"),
])
def test_training_profile_groups_the_steps_ops_by_layer(framework, title):
    """`--train`: bench_train.py's step profiled, its ops grouped by the layer they come from, the
    gradient's with their layer (TensorFlow: named under it; JAX: read off the step's module that XLA
    writes out, its thunks marked "(gradient)"), the optimizer's under its own name."""
    proc = _profile("--model", "v2_atto", "--image-size", "32", "--batch", "2", "--train", "--passes", "1",
                    "--repeats", "2", "--top", "400", "--frameworks", framework)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = _section(proc.stdout, title)
    assert re.search(r"ms per call .*profiled: [\d.]+ ms per training step", profile), profile
    by_layer = profile.split("by layer (forward and gradient ops together):")[1]
    layers = set(re.findall(r"^ +[\d.]+ ms  (\S+)$", by_layer, re.M))
    assert {"mlp_fc1", "mlp_fc2", "conv_dw", "norm", "stem", "downsample", "layer_decay_adam_w"} <= layers, by_layer
    if framework == "jax":
        rows = re.findall(r"^ +[\d.]+ ms +\d+ x  (\w+): (\S+)( \(gradient\))? \[", profile, re.M)
        gradient = {layer for layer, _, marked in rows if marked}
        assert {"mlp_fc1", "mlp_fc2", "conv_dw", "norm"} <= gradient, profile
        assert not any(op in ("while", "cond") for _, op, _ in rows), profile


def test_compare_layer_norms_times_every_form_against_the_librarys():
    proc = _profile("--model", "v2_atto", "--image-size", "64", "--repeats", "3", "--compare-layer-norms")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^  (\w+) +([\d.]+) ms per call +([\d.]+)x the library's time$", proc.stdout, re.M)
    assert [form for form, _, _ in rows] == ["library", "portable", "xla"], proc.stdout
    library = float(rows[0][1])
    for _, ms, ratio in rows:
        # Times are printed to 0.1 ms, the ratio (of the unrounded times) to 0.01.
        low = (float(ms) - 0.05) / (library + 0.05)
        high = (float(ms) + 0.05) / max(library - 0.05, 1e-9)
        assert low - 0.005 <= float(ratio) <= high + 0.005, (ms, library, ratio)


def test_layer_norm_sizes_prints_both_forms_per_size():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "layer_norm_sizes.py"), "--channels", "40",
         "--pixels", "49,3136", "--chain", "2", "--repeats", "3"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [(c, p) for c, p, *_ in rows] == [("40", "49"), ("40", "3136")], proc.stdout
    for channels, pixels, values, short, fused, ratio in rows:
        assert int(values) == int(channels) * int(pixels)
        assert float(ratio) == pytest.approx(float(short) / float(fused), abs=0.01)
