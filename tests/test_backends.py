"""Smoke tests on the JAX and PyTorch Keras backends, each in its own process.

The backend is fixed when Keras is imported, so every backend runs in a
subprocess with KERAS_BACKEND set. Each one rebuilds the model from the JSON
config written by this (TensorFlow) process, loads its weights, must
reproduce its outputs, reloads them through the preset loading path (variables
created straight from the file's values), trains that model a few steps (the
loss falls) and round-trips a `.keras` file.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from convnext_zoo import ConvNeXtBackbone, ConvNeXtImageClassifier
from tests.run_helpers import SHALLOW_V2

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    import numpy as np
    import convnext_zoo

    workdir, backend = sys.argv[1], sys.argv[2]
    assert keras.config.backend() == backend, keras.config.backend()
    # The kernels' initializer (drawn in fixed-size chunks on JAX): truncated
    # at 2 std (std 0.88 x 0.02), reproducible per seed, chunks independent.
    from convnext_zoo.backbone import ConvInitializer
    def draw(seed, shape):
        return keras.ops.convert_to_numpy(ConvInitializer(stddev=0.02, seed=seed)(shape, "float32"))
    small, same, other, large = draw(5, (7, 7, 1, 48)), draw(5, (7, 7, 1, 48)), draw(6, (7, 7, 1, 48)), \
        draw(5, (2500, 2000))  # two chunks of 2**22 on JAX
    assert small.shape == (7, 7, 1, 48) and large.shape == (2500, 2000) and large.dtype == np.float32
    np.testing.assert_array_equal(small, same)
    assert not np.any(small == other)
    # Keras' PyTorch backend keeps the first of 4 draws when none is inside (4e-6 of the values).
    beyond = np.mean(np.abs(large) > 0.04 + 1e-6)
    assert (beyond == 0 if backend == "jax" else beyond < 2e-5) and abs(large.mean()) < 1e-4, beyond
    assert abs(large.std() / (0.88 * 0.02) - 1) < 0.01, large.std()
    first, second = large.reshape(-1)[:800_000], large.reshape(-1)[2**22:2**22 + 800_000]
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.01
    if backend == "jax":  # inside jax.jit, as Keras creates the variables it shards at creation
        import jax
        jitted = jax.jit(ConvInitializer(stddev=0.02, seed=5).__call__, static_argnames=["shape", "dtype"])
        traced = np.asarray(jitted(shape=(7, 7, 1, 48), dtype="float32"))
        assert traced.shape == (7, 7, 1, 48) and np.abs(traced).max() <= 0.04 + 1e-6 and traced.std() > 0.015
    with open(f"{workdir}/config.json") as f:
        model = convnext_zoo.ConvNeXtImageClassifier.from_config(json.load(f))
    model.load_weights(f"{workdir}/model.weights.h5")
    data = np.load(f"{workdir}/data.npz")
    out = keras.ops.convert_to_numpy(model.predict(data["x"], verbose=0))
    diff = np.abs(out - data["expected"]).max() / np.abs(data["expected"]).max()
    assert diff < 1e-4, f"outputs differ from TensorFlow by {diff}"
    # The loading path: pending variables created from the file's values.
    from convnext_zoo import internals, weights
    weights.save_weights(model, f"{workdir}/model.safetensors")
    # Drop path draws its masks from a seed generator made with the layer:
    # seeded here, the training below is the same in every run (unseeded, one
    # CI run in many saw the loss rise over the 5 steps).
    keras.utils.set_random_seed(0)
    with internals.weights_to_be_loaded():
        with open(f"{workdir}/config.json") as f:
            model = convnext_zoo.ConvNeXtImageClassifier.from_config(json.load(f))
    # Deferred on JAX; PyTorch layers need their values at build time.
    assert internals.can_defer_variables() == (backend == "jax")
    assert any(internals.is_pending(v) for v in model.weights) == (backend == "jax")
    weights.load_weights(model, f"{workdir}/model.safetensors")
    assert not any(internals.is_pending(v) for v in model.weights)
    reloaded = keras.ops.convert_to_numpy(model.predict(data["x"], verbose=0))
    np.testing.assert_array_equal(reloaded, out)
    keras.utils.set_random_seed(0)
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    labels = np.array([0, 1])
    # Judged in inference mode: drop path makes the training-mode loss noisy.
    before = model.evaluate(data["x"], labels, verbose=0)
    history = model.fit(data["x"], labels, epochs=5, batch_size=2, verbose=0)
    after = model.evaluate(data["x"], labels, verbose=0)
    assert np.isfinite(history.history["loss"]).all(), history.history
    assert after < before, (before, after)
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


def _v2_shallow():
    # The V2 code path (GRN, no layer scale) in a shallow configuration, as V1
    # below: full V2 atto compiled for 70 of this test's 105 s on JAX (the
    # full-size presets run on JAX in test_preset_backends.py).
    backbone = ConvNeXtBackbone(**SHALLOW_V2, drop_path_rate=0.1, image_shape=(64, 64, 3))
    return ConvNeXtImageClassifier(backbone, num_classes=3)


def _v1_shallow():
    # The V1 code path (layer scale instead of GRN) in a shallow configuration:
    # compiling full V1 tiny on JAX takes minutes on 2 cores.
    backbone = ConvNeXtBackbone(
        depths=(1, 1, 2, 1), hidden_dims=(16, 32, 48, 64), use_grn=False,
        layer_scale_init_value=0.5, drop_path_rate=0.1, image_shape=(64, 64, 3),
    )
    return ConvNeXtImageClassifier(backbone, num_classes=3)


@pytest.mark.parametrize("backend, build", [
    pytest.param("jax", _v2_shallow, id="v2-shallow-jax"),
    # V1 differs from V2 on JAX only by its layer scale (an element-wise product): in the slow group.
    pytest.param("jax", _v1_shallow, id="v1-shallow-jax", marks=pytest.mark.slow),
    pytest.param("torch", _v2_shallow, id="v2-shallow-torch"),
    pytest.param("torch", _v1_shallow, id="v1-shallow-torch"),
])
def test_backend_builds_matches_tensorflow_and_trains(backend, build, tmp_path, rng):
    model = build()
    # Random, non-trivial weights everywhere (GRN and layer scale included).
    model.set_weights([
        (rng.normal(size=w.shape) * (0.5 if w.ndim == 1 else 1 / np.sqrt(np.prod(w.shape[:-1])))
         + (1.0 if w.ndim == 1 else 0.0)).astype("float32")
        for w in model.get_weights()
    ])
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x, expected=model.predict(x, verbose=0))
    model.save_weights(tmp_path / "model.weights.h5")
    (tmp_path / "config.json").write_text(json.dumps(model.get_config()))
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), backend],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
