"""Unit tests of the custom layers against direct NumPy formulas."""

import keras
import numpy as np
import pytest

from convnext_zoo.layers import (
    DropPath,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    PointwiseLayerNorm,
)


def grn_numpy(x, gamma, beta, eps=1e-6):
    x = x.astype(np.float64)
    gx = np.sqrt((x**2).sum(axis=(1, 2), keepdims=True))
    nx = gx / (gx.mean(axis=-1, keepdims=True) + eps)
    return gamma * (x * nx) + beta + x


def test_grn_matches_the_formula(rng):
    x = rng.normal(size=(2, 5, 6, 8)).astype("float32")
    layer = GlobalResponseNorm()
    layer.build(x.shape)
    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    layer.set_weights([gamma.astype("float32"), beta.astype("float32")])
    out = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(out, grn_numpy(x, gamma, beta), rtol=1e-5, atol=1e-5)


def test_grn_epsilon_is_outside_the_sqrt():
    # With an all-zero input, eps inside the sqrt would give Nx = sqrt(eps)/...;
    # outside it, Nx is exactly 0 and the output is beta.
    layer = GlobalResponseNorm()
    layer.build((1, 2, 2, 3))
    layer.set_weights([np.ones(3, "float32"), np.full(3, 0.5, "float32")])
    out = keras.ops.convert_to_numpy(layer(np.zeros((1, 2, 2, 3), "float32")))
    np.testing.assert_array_equal(out, np.full((1, 2, 2, 3), 0.5, "float32"))


def test_grn_reduces_in_float32_under_float16(rng):
    # Sum of squares of 56*56 values of 300 is ~2.8e8: far beyond float16's 65504.
    x = np.full((1, 56, 56, 4), 300.0, "float32") + rng.normal(size=(1, 56, 56, 4))
    layer = GlobalResponseNorm(dtype="mixed_float16")
    layer.build(x.shape)
    layer.set_weights([np.full(4, 0.1, "float32"), np.zeros(4, "float32")])
    out = keras.ops.convert_to_numpy(layer(x.astype("float16")))
    assert out.dtype == np.float16
    assert np.isfinite(out).all()
    expected = grn_numpy(x.astype("float16").astype("float32"), 0.1, 0.0)
    np.testing.assert_allclose(out.astype("float32"), expected, rtol=2e-3)


def test_layer_scale_multiplies_channels(rng):
    layer = LayerScale(1e-6)
    x = rng.normal(size=(2, 3, 3, 5)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(out, x * 1e-6, rtol=1e-6)
    assert layer.gamma.shape == (5,)


def test_drop_path_is_identity_in_inference_and_drops_samples_in_training():
    layer = DropPath(0.5, seed=1)
    x = np.ones((4000, 1, 1, 2), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), x)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = out[:, 0, 0, :]
    # Each sample is dropped or kept whole, kept ones scaled by 1 / keep.
    assert set(np.unique(per_sample)) == {0.0, 2.0}
    assert (per_sample[:, 0] == per_sample[:, 1]).all()
    assert abs(per_sample.mean() - 1.0) < 0.1


def test_drop_path_rejects_bad_rates():
    with pytest.raises(ValueError, match=r"rate=1.0"):
        DropPath(1.0)
    with pytest.raises(ValueError, match=r"rate=-0.1"):
        DropPath(-0.1)


@pytest.mark.parametrize(
    "layer",
    [
        GlobalResponseNorm(epsilon=1e-5),
        LayerScale(0.3),
        DropPath(0.2, seed=3),
        PointwiseDense(8, activation="gelu"),
        PointwiseLayerNorm(epsilon=1e-6),
    ],
)
def test_layers_round_trip_their_config(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def _twin(layer, reference, x):
    """Builds both layers on x and gives the reference the layer's weights."""
    layer(x)
    reference(x)
    rng = np.random.default_rng(7)
    values = [rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()]
    layer.set_weights(values)
    reference.set_weights(values)
    return values


def _compiled(layer, jit_compile=False):
    # The fast paths matter inside a traced graph (tf.function on TF, with
    # XLA when jit_compile).
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: layer(x), autograph=False, jit_compile=jit_compile)
    return layer


@pytest.mark.parametrize("activation", ["gelu", None, "relu"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 12), (4, 12)])
def test_pointwise_dense_matches_dense(rng, activation, shape):
    x = (rng.standard_normal(shape) * 2).astype("float32")
    layer = PointwiseDense(20, activation=activation)
    reference = keras.layers.Dense(20, activation=activation)
    _twin(layer, reference, x)
    expected = keras.ops.convert_to_numpy(reference(x))
    if activation == "gelu":
        # Exact (erf) GELU, as in the reference network, not the tanh form.
        import math

        pre = x @ layer.get_weights()[0] + layer.get_weights()[1]
        erf = np.vectorize(math.erf)(pre.astype(np.float64) / math.sqrt(2.0))
        np.testing.assert_allclose(expected, 0.5 * pre * (1 + erf), rtol=1e-4, atol=1e-5)
    for output in (layer(x), _compiled(layer)(x)):
        output = keras.ops.convert_to_numpy(output)
        assert output.shape == shape[:-1] + (20,)
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 5, 12), (3, 7, 12), (4, 12)])
def test_pointwise_layer_norm_matches_layer_normalization(rng, shape):
    # A large common offset: a one-pass variance (E[x^2] - mean^2) would
    # lose most digits here; the two-pass form must not.
    x = (rng.standard_normal(shape) * 3 + 40).astype("float32")
    layer = PointwiseLayerNorm(epsilon=1e-6)
    reference = keras.layers.LayerNormalization(epsilon=1e-6)
    _twin(layer, reference, x)
    expected = keras.ops.convert_to_numpy(reference(x))
    x64 = x.astype(np.float64)
    gamma, beta = (w.astype(np.float64) for w in layer.get_weights())
    mean = x64.mean(axis=-1, keepdims=True)
    normed = (x64 - mean) / np.sqrt(x64.var(axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(expected, normed * gamma + beta, rtol=1e-4, atol=1e-4)
    outputs = [layer(x), _compiled(layer)(x)]
    if keras.config.backend() == "tensorflow":
        outputs.append(_compiled(layer, jit_compile=True)(x))
    for output in outputs:
        output = keras.ops.convert_to_numpy(output)
        assert output.shape == shape
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"axis": 1}, {"axis": [1, 3]}, {"center": False}, {"scale": False},
     pytest.param({"rms_scaling": True}, marks=pytest.mark.filterwarnings("ignore:You passed `rms_scaling")),
     {"dtype": "mixed_float16"}],
)
def test_pointwise_layer_norm_falls_back_to_keras_for_other_settings(rng, kwargs):
    x = (rng.standard_normal((2, 4, 5, 6)) + 1).astype("float32")
    layer = PointwiseLayerNorm(**kwargs)
    reference = keras.layers.LayerNormalization(**kwargs)
    if kwargs.get("dtype") == "mixed_float16":
        x = x.astype("float16")
    _twin(layer, reference, x)
    expected = keras.ops.convert_to_numpy(reference(x))
    for output in (layer(x), _compiled(layer)(x)):
        output = keras.ops.convert_to_numpy(output)
        assert output.dtype == expected.dtype
        np.testing.assert_allclose(output, expected, rtol=1e-3, atol=1e-3)


def test_pointwise_layer_norm_graph_has_no_squared_difference():
    """The TensorFlow graph is the short form, not Keras' general formula.

    It divides by a square root (TensorFlow's optimiser makes that an rsqrt
    multiply: the profile test in test_bench.py forbids Sqrt at run time),
    the form OpenVINO fuses into MVN (test_inference.py).
    """
    if keras.config.backend() != "tensorflow":
        pytest.skip("TensorFlow graph form only")
    import tensorflow as tf

    layer = PointwiseLayerNorm()
    layer.build((None, 8, 8, 16))
    graph = (
        tf.function(lambda x: layer(x), autograph=False)
        .get_concrete_function(tf.TensorSpec((None, 8, 8, 16)))
        .graph
    )
    kinds = {op.type for op in graph.get_operations()}
    assert {"Sqrt", "RealDiv"} <= kinds and "SquaredDifference" not in kinds, sorted(kinds)


def test_grn_under_xla_uses_portable_ops(rng):
    """XLA has no EuclideanNorm kernel: GRN must still compile and match."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("XLA inside a TensorFlow graph only")
    x = rng.normal(size=(2, 5, 6, 8)).astype("float32")
    layer = GlobalResponseNorm()
    layer.build(x.shape)
    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    layer.set_weights([gamma.astype("float32"), beta.astype("float32")])
    expected = grn_numpy(x, gamma, beta)
    for forward in (_compiled(layer), _compiled(layer, jit_compile=True)):
        out = keras.ops.convert_to_numpy(forward(x))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
