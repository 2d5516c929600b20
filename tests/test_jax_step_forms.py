"""benchmarks/jax_step_forms.py: the seven forms compiled, alternated and in agreement."""

import json

import pytest

from tests.run_helpers import run_benchmark


@pytest.mark.slow
def test_one_round_times_the_seven_forms_and_they_agree(tmp_path):
    """A small V2 atto gradient step at 32 px: every form timed, all seven gradients equal Keras' forms'."""
    out = tmp_path / "forms.json"
    result = run_benchmark("jax_step_forms.py", "--model", "v2_atto", "--batch", "2", "--image-size", "32",
                           "--rounds", "1", "--output", out, backend="jax", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results["ms"]) == ["both", "erfc", "flat", "keras", "patch", "recompute", "taps"]
    assert all(len(t) == 1 and t[0] > 0 for t in results["ms"].values())
    assert all(d <= 1e-4 for d in results["max_relative_difference"].values()), results["max_relative_difference"]
    assert results["machine"]["cpu"] and isinstance(results["machine"]["avx512"], bool)
    assert f"keras / both {results['median_ms']['keras'] / results['median_ms']['both']:.2f}x" in result.stdout


@pytest.mark.slow
def test_forward_mode_traces_every_form_anew(tmp_path):
    """`--mode forward` traces each form with its own switches: `jax.jit` reuses the trace of a function it
    has seen, which once gave all of them the first form's. So the patch form's logits differ from Keras'
    forms' by round-off, not by nothing, and the flat switch flattens the MLP's matmuls at inference
    (flattening alone leaves the logits bit-equal; `flat` and `both` also take the erf GELU, `erfc` not),
    read off each form's StableHLO."""
    out = tmp_path / "forward.json"
    result = run_benchmark("jax_step_forms.py", "--model", "v2_atto", "--batch", "2", "--image-size", "32",
                           "--rounds", "1", "--mode", "forward", "--output", out, backend="jax", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    differences, matmuls = results["max_relative_difference"], results["matmuls_2d"]
    # V2 atto has 12 blocks of two MLP matmuls; the head's (and the patch form's) are 2-D in every form.
    assert matmuls["flat"] - matmuls["keras"] == matmuls["both"] - matmuls["patch"] == 2 * 12, matmuls
    assert matmuls["recompute"] == matmuls["taps"] == matmuls["erfc"] == matmuls["both"], matmuls
    assert differences["keras"] == 0.0
    assert all(0.0 < differences[form] <= 1e-4 for form in ("patch", "both", "recompute")), differences
