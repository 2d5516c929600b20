"""Smoke tests on the JAX and PyTorch Keras backends, each in its own process.

The backend is fixed when Keras is imported, so every backend runs in a
subprocess with KERAS_BACKEND set. Each one loads weights written by this
(TensorFlow) process and must reproduce its outputs, then trains a step and
round-trips a `.keras` file.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from convnext_zoo import create_convnext_v1, create_convnext_v2

SCRIPT = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np
    import convnext_zoo

    family, workdir = sys.argv[1], sys.argv[2]
    assert keras.config.backend() == sys.argv[3], keras.config.backend()
    create = {"v1": convnext_zoo.create_convnext_v1, "v2": convnext_zoo.create_convnext_v2}[family]
    variant = {"v1": "tiny", "v2": "atto"}[family]
    model = create(variant, num_classes=3, input_shape=(64, 64, 3), drop_path_rate=0.1)
    model.load_weights(f"{workdir}/model.weights.h5")
    data = np.load(f"{workdir}/data.npz")
    out = keras.ops.convert_to_numpy(model.predict(data["x"], verbose=0))
    diff = np.abs(out - data["expected"]).max() / np.abs(data["expected"]).max()
    assert diff < 1e-4, f"outputs differ from TensorFlow by {diff}"
    if family == "v2":  # Training runs the same code for V1; JAX compiles slowly.
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(data["x"], np.array([0, 1]), epochs=2, batch_size=2, verbose=0)
        assert all(np.isfinite(history.history["loss"]))
    model.save(f"{workdir}/trained.keras")
    loaded = keras.saving.load_model(f"{workdir}/trained.keras")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.predict(data["x"], verbose=0)),
        keras.ops.convert_to_numpy(model.predict(data["x"], verbose=0)),
        rtol=1e-5, atol=1e-5,
    )
    print("ok", diff)
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_backend_builds_matches_tensorflow_and_trains(backend, family, tmp_path, rng):
    create = {"v1": create_convnext_v1, "v2": create_convnext_v2}[family]
    variant = {"v1": "tiny", "v2": "atto"}[family]
    model = create(variant, num_classes=3, input_shape=(64, 64, 3), drop_path_rate=0.1)
    # Random, non-trivial weights everywhere (GRN and layer scale included).
    model.set_weights([
        (rng.normal(size=w.shape) * (0.5 if w.ndim == 1 else 1 / np.sqrt(np.prod(w.shape[:-1])))
         + (1.0 if w.ndim == 1 else 0.0)).astype("float32")
        for w in model.get_weights()
    ])
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x, expected=model.predict(x, verbose=0))
    model.save_weights(tmp_path / "model.weights.h5")
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, family, str(tmp_path), backend],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
