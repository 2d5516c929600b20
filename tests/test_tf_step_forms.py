"""benchmarks/tf_step_forms.py: both forms traced, alternated and in agreement."""

import json

import pytest

from tests.run_helpers import run_benchmark


@pytest.mark.slow
def test_one_round_times_both_forms_and_their_gradients_agree(tmp_path):
    """A small V2 atto step at 32 px: both forms timed; the written-out gradient differs from TensorFlow's
    own by round-off, not by nothing (so each model was traced with its own form) and not by more."""
    out = tmp_path / "forms.json"
    result = run_benchmark("tf_step_forms.py", "--model", "v2_atto", "--batch", "2", "--image-size", "32",
                           "--rounds", "1", "--output", out, backend="tensorflow", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results["seconds"]) == ["library", "tensorflow"]
    assert all(len(t) == 1 and t[0] > 0 for t in results["seconds"].values())
    differences = results["max_relative_difference"]
    assert differences["tensorflow"] == 0.0
    assert 0.0 < differences["library"] <= 1e-4, differences
    assert results["machine"]["cpu"] and isinstance(results["onednn"], bool)
    ratio = results["speedup_per_round"]["library"]
    assert f"tensorflow / library {ratio:.2f}x" in result.stdout


def test_it_refuses_another_backend():
    result = run_benchmark("tf_step_forms.py", "--rounds", "1", backend="jax", timeout=300)
    assert result.returncode != 0
    assert "run it with KERAS_BACKEND=tensorflow" in result.stderr and "'jax'" in result.stderr
