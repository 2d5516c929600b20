"""Converted presets give timm's logits on every Keras backend.

Each backend runs in its own subprocess (Keras picks its backend at import),
with `KERAS_BACKEND` set; the subprocess loads the converted preset
directories with `convnext_zoo.from_preset` and writes its logits
to files that this process compares with timm's.
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = importlib.import_module("torch")
timm = importlib.import_module("timm")

CASES = [("v2", "atto")]
SIZES = [(224, 224), (200, 264)]
# TensorFlow is covered in-process by tests/test_convert_parity.py.
BACKENDS = ["jax", "torch"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNNER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    from convnext_zoo import from_preset

    jobs = json.loads(sys.argv[1])
    assert keras.backend.backend() == jobs["backend"], keras.backend.backend()
    for name, preset in jobs["presets"].items():
        model = from_preset(preset, preprocessing=False)  # the inputs are normalised already
        for index, path in enumerate(jobs["inputs"]):
            x = np.load(path)
            y = model.predict(x, batch_size=len(x), verbose=0)
            np.save(f"{jobs['out']}/{name}_{index}.npy", np.asarray(y, dtype="float32"))
    """
)


@torch.no_grad()
def _randomise(model, seed):
    """Every parameter random at realistic magnitudes (pitfalls §5)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif name.endswith(("grn.weight", ".gamma")):
            p.copy_(0.5 + 0.3 * noise)
        elif p.ndim == 1:
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(noise * p[0].numel() ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from safetensors.torch import save_file

    from convnext_zoo.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("backends")
    rng = np.random.default_rng(0)
    inputs, presets, references = [], {}, {}
    for index, (h, w) in enumerate(SIZES):
        path = root / f"x{index}.npy"
        np.save(path, rng.normal(size=(2, h, w, 3)).astype("float32"))
        inputs.append(str(path))
    for seed, (family, variant) in enumerate(CASES):
        arch = f"convnext{'v2' if family == 'v2' else ''}_{variant}"
        model = _randomise(timm.create_model(arch, num_classes=10), seed)
        source = root / arch
        source.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(source / "model.safetensors"))
        presets[arch] = str(root / f"{arch}_preset")
        convert_checkpoint(str(source / "model.safetensors"), presets[arch])
        for index, path in enumerate(inputs):
            x = torch.from_numpy(np.load(path)).permute(0, 3, 1, 2)
            with torch.no_grad():
                references[arch, index] = model(x).numpy()
    return inputs, presets, references


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_presets_match_timm_on_backend(backend, converted, tmp_path):
    inputs, presets, references = converted
    jobs = {"backend": backend, "presets": presets, "inputs": inputs, "out": str(tmp_path)}
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for (arch, index), reference in references.items():
        ours = np.load(tmp_path / f"{arch}_{index}.npy")
        assert ours.shape == reference.shape
        diff = np.max(np.abs(ours - reference))
        scale = np.max(np.abs(reference))
        assert diff <= 1e-4 * scale, f"{backend} {arch} {SIZES[index]}: {diff} vs {scale}"
