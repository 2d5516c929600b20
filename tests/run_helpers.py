"""Shared by the tests that run commands: a command run in-process, a run killed mid-way, then
resumed, a small preset to train, and a benchmark script run in its own process."""

import json
import os
import signal
import subprocess
import sys
import time

from convnext_zoo import cli


def run_cli(capsys, command, *argv):
    """Runs `convnext-zoo COMMAND ARGV...` in this process; returns (exit status, stdout, stderr)."""
    status = cli.main([command, *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script, *args, backend, timeout=600):
    """Runs `python benchmarks/SCRIPT ARGS...` from the repository root in a fresh process on the Keras
    `backend`, on the CPU; returns the finished process, its output captured as text."""
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    if backend == "jax":
        env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def kill_after_epochs(argv, env, epochs_file, epochs=2, timeout=600):
    """Starts `argv`, SIGKILLs it once `epochs_file` lists `epochs` finished epochs; returns those records."""
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and first.poll() is None:
            if epochs_file.exists() and len(json.loads(epochs_file.read_text() or "[]")) >= epochs:
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stdout.read()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    return json.loads(epochs_file.read_text())


def resumed_epochs(argv, env, timeout=900):
    """Runs `argv --resume` to the end; returns the epoch numbers its progress lines showed."""
    resumed = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=timeout)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    return [int(line.split()[1].split("/")[0]) for line in resumed.stdout.splitlines()
            if line.startswith("Epoch ")]


# The V2 code path (GRN, no layer scale) in 1, 1, 2, 1 blocks: the tests' small V2.
SHALLOW_V2 = dict(depths=(1, 1, 2, 1), hidden_dims=(16, 32, 48, 64), use_grn=True, layer_scale_init_value=None)


def write_shallow_preset(path, num_classes=3):
    """A random V2 preset (GRN) of 1, 1, 2, 1 blocks at 32 px; returns `path`.

    The training commands' paths at a fraction of V2 atto's cost: atto's
    training step traced for 10-15 s on TensorFlow and compiled for 18 s on
    JAX, in every process.
    """
    import keras

    import convnext_zoo
    from convnext_zoo import writer

    keras.utils.set_random_seed(1)
    backbone = convnext_zoo.ConvNeXtBackbone(**SHALLOW_V2, image_shape=(32, 32, 3))
    writer.save_preset(convnext_zoo.ConvNeXtImageClassifier(backbone, num_classes=num_classes), path)
    return path
