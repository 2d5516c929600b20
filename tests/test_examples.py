"""The scripts in examples/ run as the README says, offline (random weights), on real images."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join("examples", script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_classify_prints_top_k_imagenet_labels():
    lines = _run("classify.py", "examples/chelsea.jpg", "--top", "3", "--no-weights")
    assert lines[0] == "examples/chelsea.jpg"
    rows = [re.fullmatch(r"\s+(\d+\.\d)%  (.+) \((n\d{8})\)", line) for line in lines[1:]]
    assert len(rows) == 3 and all(rows), lines
    scores = [float(row.group(1)) for row in rows]
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 100


def test_classify_reports_a_missing_image():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "examples/classify.py", "missing.jpg", "--no-weights"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "missing.jpg" in result.stderr


def test_extract_features_embeds_photographs_and_returns_the_pyramid():
    lines = _run("extract_features.py", "--no-weights")
    assert lines[0] == "embeddings: (4, 320)"
    assert lines[1] == "cosine similarity"
    similarity = [line.split() for line in lines[2:6]]
    assert [row[0] for row in similarity] == ["chelsea", "coffee", "astronaut", "rocket"]
    for i, row in enumerate(similarity):
        values = [float(v) for v in row[1:]]
        assert len(values) == 4 and values[i] == pytest.approx(1.0, abs=1e-3)
        assert all(-1.001 <= v <= 1.001 for v in values)
    assert lines[6:] == ["P2: (1, 56, 56, 40)", "P3: (1, 28, 28, 80)", "P4: (1, 14, 14, 160)",
                         "P5: (1, 7, 7, 320)"]


@pytest.mark.slow  # a training run: about a minute
def test_fine_tune_digits_learns_the_digits():
    # From random weights (offline): 800 training digits, 3 epochs. Chance is 0.1.
    lines = _run("fine_tune_digits.py", "--no-weights", "--train-samples", "800", "--epochs", "3")
    match = re.fullmatch(r"held-out accuracy: (\d\.\d{3}) on 997 digits", lines[-1])
    assert match, lines
    assert float(match.group(1)) > 0.8
