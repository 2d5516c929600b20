"""benchmarks/jax_model_build.py: both forms measured in fresh JAX processes, the results written."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax_model_build  # noqa: E402


@pytest.mark.slow
def test_one_round_times_both_forms(tmp_path, capsys):
    out = tmp_path / "build.json"
    jax_model_build.main(["--models", "v2_atto", "--rounds", "1", "--output", str(out)])
    results = json.loads(out.read_text())
    seconds = results["models"]["v2_atto"]["seconds"]
    assert sorted(seconds) == ["chunked", "keras"]
    assert all(len(t) == 1 and t[0] > 0 for t in seconds.values())
    assert results["machine"]["cpu"] and isinstance(results["machine"]["avx512"], bool)
    medians = results["models"]["v2_atto"]["median_s"]
    printed = capsys.readouterr().out
    assert f"v2_atto: chunked {medians['chunked']:.2f} s, keras {medians['keras']:.2f} s" in printed
