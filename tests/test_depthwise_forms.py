"""benchmarks/depthwise_forms.py, part `kernel_grad`: the depthwise kernel's gradient in both forms, timed
alternately, in agreement, with the form the layer takes for each shape."""

import re

import pytest

from tests.run_helpers import run_benchmark

ROW = re.compile(r"^\| (\d+) \| (\d+)x(\d+)x(\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| (\w+) \| (\S+) \|$",
                 re.M)


def _run(*args):
    return run_benchmark("depthwise_forms.py", *args, backend="jax")


def test_kernel_grad_times_both_forms_and_names_the_layers_choice():
    """V2 atto's four stages at batch 32, 224 px: the first two large enough for the Gram form, the last
    two not (`layers._kernel_gradient_form`), both forms within float32 round-off of each other."""
    from convnext_zoo import layers

    proc = _run("--parts", "kernel_grad", "--batch-sizes", "32", "--models", "atto", "--rounds", "1",
                "--threads", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = ROW.findall(proc.stdout)
    shapes = [tuple(int(v) for v in row[:4]) for row in rows]
    assert shapes == [(32, 56, 56, 40), (32, 28, 28, 80), (32, 14, 14, 160), (32, 7, 7, 320)], proc.stdout
    for shape, (*_, mib, taps, gram, ratio, taken, difference) in zip(shapes, rows):
        assert float(mib) == pytest.approx(4 * shape[0] * shape[1] * shape[2] * shape[3] / 2**20, abs=0.05)
        # Times printed to 0.1 ms, the ratio of the unrounded times to 0.01.
        low, high = (float(taps) - 0.05) / (float(gram) + 0.05), (float(taps) + 0.05) / (float(gram) - 0.05)
        assert low - 0.005 <= float(ratio) <= high + 0.005, (taps, gram, ratio)
        expected = layers._kernel_gradient_form(shape, 7)
        assert taken == expected.__name__.rsplit("_", 1)[1], (shape, taken)
        assert 0 < float(difference) <= 1e-5, (shape, difference)
    assert [row[8] for row in rows] == ["gram", "gram", "taps", "taps"], proc.stdout


def test_unknown_part_is_refused_with_the_accepted_ones():
    proc = _run("--parts", "kernel_gradient")
    assert proc.returncode == 2
    assert "--parts received kernel_gradient; accepted: forms,block,kernels,patch,kernel_grad." in proc.stderr
