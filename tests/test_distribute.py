"""`convnext_zoo.distribute` and `finetune --distribute`: the same numbers on 2 devices as on one.

Each distributed configuration runs in its own process (`tests/distribute_worker.py`):
the number of (virtual CPU) devices is fixed when the backend starts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convnext_zoo import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(tmp_path, backend, devices, case, *args, timeout=900):
    out = str(tmp_path / f"{case}_{'_'.join(a for a in args if os.sep not in a)}.json")
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    if devices:
        env[distribute.CPU_DEVICES_ENV] = str(devices)
    else:
        env.pop(distribute.CPU_DEVICES_ENV, None)
    result = subprocess.run([sys.executable, "-m", "tests.distribute_worker", case, out, *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out, encoding="utf-8") as handle:
        return json.load(handle), out


def _relative(a, b):
    """`|a - b| / |b|` (Frobenius norms)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_data_parallel_fine_tuning_matches_one_device(backend, tmp_path):
    """10 training steps (10 one-step epochs) on 2 CPU devices: the single-device losses.

    Each step sees all 10 training images (global batch 10), so the runs agree
    whatever order the input pipeline gives them: TensorFlow's distributed
    dataset draws another order from the same seeded shuffle (with a batch of
    8 of the 10 images the first losses differed by 0.5 %). Two fine-tunings
    per backend (a shallow V2 preset: full atto compiled for minutes on JAX), hence `slow`.
    """
    result, _ = _worker(tmp_path, backend, 2, "data_parallel", str(tmp_path))
    single, data = result["losses"]["None"], result["losses"]["data"]
    assert len(single) == len(data) == 10
    # Training moves: the comparison is not between two constant sequences.
    assert abs(single[-1] - single[0]) > 0.05 * abs(single[0])
    for step, (a, b) in enumerate(zip(single, data)):
        assert abs(a - b) <= 1e-3 * abs(a), (step, a, b)
    assert result["distribute"]["data"] == {
        "mode": "data", "backend": backend, "devices": 2, "replicas": 2, "model_shards": 1,
        "per_replica_batch": 5}
    assert result["distribute"]["None"]["mode"] is None
    # The final evaluation is the written single-device preset's, on all 10 images.
    assert result["final"]["data"]["val_accuracy"] == pytest.approx(
        result["final"]["None"]["val_accuracy"], abs=0.1 + 1e-6)
    # predict inside the data scope (5 images: the padding is dropped) = one device.
    assert result["predict_shape"] == [5, 10]
    assert result["predict_max_diff"] <= 1e-4 * result["predict_scale"]
    # A global batch that does not split over the replicas: one line, exit 2, nothing written.
    cli = result["cli"]
    lines = cli["stderr"].strip().splitlines()
    assert cli["status"] == 2 and len(lines) == 1, cli
    assert "global batch size 3 does not divide by the 2" in lines[0]
    assert "--batch-size 2 or 4" in lines[0]
    assert cli["written"] == []


def _model_parallel(tmp_path, preset, size, batch, one_process=True):
    """`{mode: result}` of one training step on one device ("none") and model-parallel on 2."""
    runs = {}
    for modes in (["none,model"] if one_process else ["none", "model"]):
        result, out = _worker(tmp_path, "jax", 2, "model_parallel_step", preset, modes, size, batch)
        for mode, run in result.items():
            with np.load(out[:-5] + f".{mode}.npz") as arrays:
                run["weights"] = dict(arrays)
            runs[mode] = run
    return runs


def _assert_sharded_and_equal(runs, mlp_blocks, weights_rtol=1e-5):
    sharding = runs["model"]["sharding"]
    fc1 = [p for p in sharding if p.endswith("mlp_fc1/kernel")]
    fc2 = [p for p in sharding if p.endswith("mlp_fc2/kernel")]
    assert len(fc1) == len(fc2) == mlp_blocks
    assert all(sharding[p] == [None, "model"] for p in fc1)
    assert all(sharding[p] == ["model", None] for p in fc2)
    assert sharding["head_fc/kernel"] == ["model", None]
    sharded = set(fc1) | set(fc2) | {"head_fc/kernel"}
    assert all(all(a is None for a in spec) for path, spec in sharding.items()
               if path not in sharded), "only the MLP and head kernels are sharded"
    # The optimizer's slots follow their variables.
    slots = runs["model"]["slots"]
    assert slots and all(s in ([None, "model"], ["model", None]) for s in slots.values())
    assert runs["model"]["placement"]["model_shards"] == 2
    assert runs["model"]["loss"] == pytest.approx(runs["none"]["loss"], rel=1e-5)
    single, sharded_weights = runs["none"]["weights"], runs["model"]["weights"]
    assert sorted(single) == sorted(sharded_weights) and single
    for name in single:
        assert _relative(sharded_weights[name], single[name]) <= weights_rtol, name


@pytest.mark.slow  # the same checks as the large variants below, on atto at 32 px
def test_model_parallel_shards_the_mlp_and_head_and_steps_like_one_device(tmp_path):
    runs = _model_parallel(tmp_path, "convnext_v2_atto", "32", "2")
    _assert_sharded_and_equal(runs, mlp_blocks=2 + 2 + 6 + 2)


@pytest.mark.slow
@pytest.mark.parametrize("preset, blocks", [("convnext_v2_huge", 3 + 3 + 27 + 3)])
def test_model_parallel_large_variants_step_like_one_device(preset, blocks, tmp_path):
    """About 4 x 2.6 GB per process for V2 huge (weights, gradients, AdamW's two slots).

    The largest variant only: V1 xlarge has the same 36 blocks and the same
    sharded layers (258 s of an AVX2 CI run; it passed there, weights to 1e-4).
    """
    # Separate processes: both runs' training state would not fit 24 GB together.
    runs = _model_parallel(tmp_path, preset, "32", "2", one_process=False)
    # The loss agrees to 1e-5; after AdamW's step the weights to 1e-4 (V2 huge's stem: 3.7e-5).
    # Sharded fc2 / head products sum their halves in another order, and Adam divides each
    # gradient by its own root mean square, so entries whose gradient is round-off-sized move
    # by a full step either way: 36 blocks deep, those differences reach the stem.
    _assert_sharded_and_equal(runs, mlp_blocks=blocks, weights_rtol=1e-4)


def _cli_run(tmp_path, backend, devices, *extra):
    from convnext_zoo import cli  # noqa: F401  (the worker imports it; fail here if broken)

    data = tmp_path / "data"
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from write_digits import write_digits

    write_digits(str(data), per_class=1)
    out = tmp_path / "out"
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(distribute.CPU_DEVICES_ENV, None)
    env.pop("XLA_FLAGS", None)
    if devices:
        env[distribute.CPU_DEVICES_ENV] = str(devices)
    before = sorted(os.listdir(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "convnext_zoo", "finetune", "convnext_v2_atto", str(data),
         "--output", str(out), "--from-scratch", "--image-size", "32", "--batch-size", "4",
         "--verbose", "0", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert sorted(os.listdir(tmp_path)) == before, "nothing written"
    return result


@pytest.mark.parametrize("backend, devices, mode, message", [
    ("tensorflow", 2, "model", "--distribute model runs on the JAX backend only"),
    ("torch", 0, "data", "--distribute data runs on the JAX backend"),
    ("jax", 0, "data", "--distribute data needs at least 2 devices; the jax backend sees 1"),
])
def test_cli_refuses_what_cannot_run(backend, devices, mode, message, tmp_path):
    result = _cli_run(tmp_path, backend, devices, "--distribute", mode)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("convnext-zoo: error: ") and message in lines[0]
    assert "KERAS_BACKEND=" in lines[0] or "CONVNEXT_ZOO_CPU_DEVICES=2" in lines[0]


def test_batch_split_and_placement_checks():
    assert distribute.batch_split(32, 2) == (32, 16)
    assert distribute.batch_split(8, 8) == (8, 1)
    with pytest.raises(distribute.DistributeError, match=r"size 30 does not divide by the 4 .*"
                                                         r"--batch-size 28 or 32"):
        distribute.batch_split(30, 4)
    with pytest.raises(distribute.DistributeError, match="Pass a multiple of 2"):
        distribute.batch_split(1, 2)
    with pytest.raises(distribute.DistributeError, match=r"Received: distribute='pipeline'"):
        distribute.plan_distribution("pipeline")
    single = distribute.plan_distribution(None)
    assert (single.replicas, single.batch_split(7)) == (1, (7, 7))
    with distribute.distribution_scope(None) as placement:
        assert placement.mode is None
    with pytest.raises(distribute.DistributeError, match="CONVNEXT_ZOO_CPU_DEVICES must be an"):
        distribute.configure_cpu_devices("two")


def test_the_layout_map_covers_every_mlp_and_the_head_only():
    import re

    import convnext_zoo

    model = convnext_zoo.from_preset("convnext_v2_atto", num_classes=10, input_shape=(32, 32, 3),
                                     load_weights=False, preprocessing=False)
    matched = {v.path: axes for v in model.weights
               for pattern, axes in distribute.MODEL_PARALLEL_LAYOUT.items()
               if re.fullmatch(pattern, v.path)}
    depths = sum(model.backbone.depths)
    assert len(matched) == 2 * depths + 1
    assert all(p.endswith(("_mlp_fc1/kernel", "_mlp_fc2/kernel")) or p == "head_fc/kernel"
               for p in matched)
    assert matched["head_fc/kernel"] == ("model", None)
    # The same layers nested in an enclosing model's path still match.
    assert any(re.fullmatch(p, "outer/stages_3_blocks_2_mlp_fc2/kernel")
               for p in distribute.MODEL_PARALLEL_LAYOUT)
