"""Unit tests of the custom layers against direct NumPy formulas."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from convnext_zoo.layers import (
    SHIFTED_MAX_TAPS,
    Conv2D,
    DepthwiseConv2D,
    DropPath,
    ExactGelu,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    PointwiseLayerNorm,
    ScaleNorm,
    export_forms,
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
        DepthwiseConv2D(kernel_size=7, padding="same", use_bias=False),
        ScaleNorm("variance", epsilon=1e-5),
        ExactGelu(),
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


def test_training_layer_norm_gives_keras_outputs_and_gradients(rng, monkeypatch):
    """With `training=True` on TensorFlow: the written-out gradient, Keras' numbers.

    The layer norm takes its training form (closed-form gradient) only when
    called for training; outputs and gradients (input, gamma, beta) match
    Keras' `LayerNormalization` differentiated by TensorFlow, and the
    inference form's. The input sits on a large common offset (the gradient
    uses the centred values, as the two-pass variance does).
    """
    if keras.config.backend() != "tensorflow":
        pytest.skip("TensorFlow forms")
    import tensorflow as tf

    from convnext_zoo import layers

    shape = (2, 6, 5, 12)
    x = (rng.standard_normal(shape) * 3 + 40).astype("float32")
    layer, reference = PointwiseLayerNorm(epsilon=1e-6), keras.layers.LayerNormalization(epsilon=1e-6)
    _twin(layer, reference, x)
    calls = []
    original = layers._training_layer_norm
    monkeypatch.setattr(layers, "_training_layer_norm", lambda *args: calls.append(1) or original(*args))
    upstream = rng.standard_normal(shape).astype("float32")

    def step(model, training):
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(model(inputs, training=training) * upstream)
        grads = tape.gradient(loss, [inputs] + [w.value for w in model.trainable_weights])
        return [model(inputs, training=training)] + grads

    results = {}
    for name, model, training in [("form", layer, True), ("inference", layer, False),
                                  ("keras", reference, True)]:
        before = len(calls)
        traced = tf.function(lambda m=model, t=training: step(m, t), autograph=False)
        results[name] = [keras.ops.convert_to_numpy(t) for t in traced()]
        assert (len(calls) > before) == (name == "form"), (name, calls)
        if name == "form":
            # The written-out gradient's ops are named under the layer (profile_ops.py --train groups by it).
            ops = [op.name for op in traced.get_concrete_function().graph.get_operations()]
            gradient_ops = [op for op in ops if "/gradient/" in op]
            assert gradient_ops and all(op.startswith(layer.name) for op in gradient_ops), ops
    for other in ("keras", "inference"):
        for ours, value in zip(results["form"], results[other]):
            np.testing.assert_allclose(ours, value, rtol=1e-4, atol=1e-4 * np.abs(value).max())


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


def test_grn_training_gradient_is_the_portable_forms(rng):
    """Training on TensorFlow's kernels: GRN's norm has a written-out gradient (EuclideanNorm's own is
    NaN at a zero norm); it gives the gradients (input, gamma, beta) of the portable form, differentiated
    by TensorFlow (`export_forms`)."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("TensorFlow kernels")
    import tensorflow as tf

    x = rng.normal(size=(2, 5, 6, 8)).astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    layer = GlobalResponseNorm()
    layer.build(x.shape)
    layer.set_weights([rng.normal(size=8).astype("float32"), rng.normal(size=8).astype("float32")])

    def gradients(portable):
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            if portable:
                with export_forms():
                    y = layer(inputs, training=True)
            else:
                y = layer(inputs, training=True)
            loss = tf.reduce_sum(y * upstream)
        return tape.gradient(loss, [inputs, layer.gamma.value, layer.beta.value])

    traced = [[g.numpy() for g in tf.function(lambda p=p: gradients(p), autograph=False)()] for p in (False, True)]
    for ours, portable in zip(*traced):
        np.testing.assert_allclose(ours, portable, rtol=1e-5, atol=1e-5 * np.abs(portable).max())


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


@pytest.mark.parametrize("shape", [(2, 6, 5, 40), (3, 320), (1, 7, 7, 768)])
def test_fused_layer_norm_matches_the_formula_and_its_gradients(rng, shape, monkeypatch):
    """Inside `fused_layer_norms`, one oneDNN kernel: the same outputs and gradients.

    The input sits on a large common offset, where a one-pass variance would
    lose most digits. Outputs are checked against the float64 formula;
    gradients (for the input, gamma and beta, through the kernel's
    recomputed gradient) against the portable form's.
    """
    if keras.config.backend() != "tensorflow":
        pytest.skip("a TensorFlow kernel")
    import tensorflow as tf

    from convnext_zoo import layers
    from convnext_zoo.layers import fused_layer_norms, onednn_layer_norm_available

    assert onednn_layer_norm_available(), "this TensorFlow has no oneDNN layer norm"
    monkeypatch.setattr(layers, "FUSED_MIN_VALUES", 0)  # these small inputs too
    x = (rng.standard_normal(shape) * 3 + 40).astype("float32")
    weights = rng.standard_normal(shape).astype("float32")
    layer = PointwiseLayerNorm(epsilon=1e-6)
    layer.build(shape)
    gamma, beta = (rng.normal(1.0, 0.5, shape[-1]), rng.normal(0.0, 0.5, shape[-1]))
    layer.set_weights([gamma.astype("float32"), beta.astype("float32")])

    def step(x, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            if fused:
                with fused_layer_norms():
                    y = layer(x)
            else:
                y = layer(x)
            loss = tf.reduce_sum(y * weights)
        return y, tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])

    runs = {}
    for fused in (True, False):
        traced = tf.function(lambda x, fused=fused: step(x, fused), autograph=False)
        kinds = [op.type for op in traced.get_concrete_function(tf.TensorSpec(shape)).graph.get_operations()]
        assert ("_MklLayerNorm" in kinds) == fused, kinds
        runs[fused] = keras.ops.convert_to_numpy(traced(x)[0]), [g.numpy() for g in traced(x)[1]]
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    expected = (x64 - mean) / np.sqrt(x64.var(axis=-1, keepdims=True) + 1e-6) * gamma + beta
    np.testing.assert_allclose(runs[True][0], expected, rtol=1e-4, atol=1e-4)
    for fused_grad, portable_grad in zip(runs[True][1], runs[False][1]):
        np.testing.assert_allclose(fused_grad, portable_grad, rtol=1e-4, atol=1e-4)


def test_layer_norms_are_fused_only_inside_the_context_and_where_onednn_is(rng, monkeypatch):
    """Outside `fused_layer_norms` (training, export) and without oneDNN: the portable form."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("a TensorFlow kernel")
    import tensorflow as tf

    from convnext_zoo import layers
    from convnext_zoo.layers import fused_layer_norms

    monkeypatch.setattr(layers, "FUSED_MIN_VALUES", 0)  # this small input too
    layer = PointwiseLayerNorm(epsilon=1e-6)
    x = rng.standard_normal((2, 5, 5, 16)).astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x))

    def kinds(fused):
        def call(x):
            if not fused:
                return layer(x)
            with fused_layer_norms():
                return layer(x)

        traced = tf.function(call, autograph=False)
        np.testing.assert_allclose(traced(x), expected, rtol=1e-5, atol=1e-5)
        return {op.type for op in traced.get_concrete_function(tf.TensorSpec(x.shape)).graph.get_operations()}

    assert "_MklLayerNorm" in kinds(fused=True)
    assert "_MklLayerNorm" not in kinds(fused=False)
    with fused_layer_norms():  # eager: no graph to put the kernel in
        np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(layers, "onednn_layer_norm_available", lambda: False)
    assert "_MklLayerNorm" not in kinds(fused=True)


_LAYER_NORM_WITHOUT_ONEDNN = """
import numpy as np
import tensorflow as tf
from convnext_zoo import internals, layers
layers.FUSED_MIN_VALUES = 0
layer = layers.PointwiseLayerNorm(epsilon=1e-6)
rng = np.random.default_rng(0)
x = (rng.standard_normal((2, 6, 5, 40)) * 3 + 40).astype("float32")
gamma, beta = rng.normal(1.0, 0.5, 40).astype("float32"), rng.normal(0.0, 0.5, 40).astype("float32")
layer.build(x.shape)
layer.set_weights([gamma, beta])
x64 = x.astype(np.float64)
expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6) * gamma + beta
def call(x):
    with layers.fused_layer_norms():
        return layer(x)
traced = tf.function(call, autograph=False)
kinds = {op.type for op in traced.get_concrete_function(tf.TensorSpec(x.shape)).graph.get_operations()}
print("oneDNN", internals.onednn_enabled(), "kernel", "_MklLayerNorm" in kinds,
      "error", float(np.abs(traced(x).numpy() - expected).max()))
"""


def test_fused_layer_norm_runs_where_tensorflow_leaves_onednn_off():
    """The library keeps `_MklLayerNorm` where TensorFlow runs without oneDNN.

    With `TF_ENABLE_ONEDNN_OPTS=0` (what a CPU without AVX-512 gets by
    default) the kernel is still registered, traced, and computes the layer
    norm (see `onednn_layer_norm_available`); the child says that its
    TensorFlow has oneDNN off.
    """
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _LAYER_NORM_WITHOUT_ONEDNN], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"^oneDNN (\w+) kernel (\w+) error (\S+)$", result.stdout, re.M)
    assert found and found.groups()[:2] == ("False", "True"), result.stdout
    assert float(found.group(3)) < 1e-4, result.stdout


@pytest.mark.parametrize("shape, fused", [
    ((1, 56, 56, 40), True),      # 125,440 values: the first stage of V2 atto at 224 px
    ((1, 28, 28, 80), False),     # 62,720 values
    ((16, 7, 7, 320), True),      # a late stage at batch 16
    ((None, 56, 56, 40), True),   # an unknown batch counts as 1
    ((None, 7, 7, 320), False),
    ((1, None, None, 768), False),  # unknown sides: too small to tell
    ((None, 768), False),         # the head's norm
])
def test_only_layer_norms_large_enough_are_fused(shape, fused, monkeypatch):
    """The fused kernel pays only from `FUSED_MIN_VALUES` values up (benchmarks/layer_norm_sizes.py)."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("a TensorFlow kernel")
    import tensorflow as tf

    from convnext_zoo import layers

    layer = PointwiseLayerNorm(epsilon=1e-6)
    layer.build(shape)

    def call(x):
        with layers.fused_layer_norms():
            return layer(x)

    graph = tf.function(call, autograph=False).get_concrete_function(tf.TensorSpec(shape)).graph
    assert ("_MklLayerNorm" in {op.type for op in graph.get_operations()}) == fused
    assert layers.FUSED_MIN_VALUES == 65536


def test_mask_token_fills_removed_positions_only(rng):
    from convnext_zoo.layers import MaskToken

    x = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    removed = (rng.uniform(size=(2, 3, 3, 1)) > 0.5).astype("float32")
    layer = MaskToken()
    out = keras.ops.convert_to_numpy(layer(x, removed))
    token = keras.ops.convert_to_numpy(layer.token)
    assert token.shape == (4,) and 0 < token.std() < 0.1
    np.testing.assert_array_equal(out, np.where(removed > 0, token, x))
    rebuilt = MaskToken.from_config(layer.get_config())
    assert rebuilt.name == layer.name


# === The depthwise convolution's shifted form (JAX on a CPU) ===

# (input shape, kernel size, padding): the block's 7x7 at odd sizes, down to
# the 1-4 px feature maps of small inputs with lowered strides, and other
# kernels the layer takes (even sides pad one more after, like Keras).
DEPTHWISE_CASES = [
    ((2, 13, 11, 5), 7, "same"),
    ((1, 4, 4, 6), 7, "same"),
    ((3, 2, 3, 4), 7, "same"),
    ((1, 1, 1, 8), 7, "same"),
    ((2, 9, 8, 3), 7, "valid"),
    ((2, 7, 6, 4), 3, "same"),
    ((1, 6, 7, 3), 4, "same"),
    ((2, 9, 8, 4), (3, 5), "valid"),
    ((1, 5, 5, 2), 1, "same"),
    ((1, 12, 12, 2), 11, "same"),
]


@pytest.mark.parametrize("shape, kernel_size, padding", DEPTHWISE_CASES)
def test_shifted_depthwise_conv_matches_the_convolution(shape, kernel_size, padding, rng):
    """The sum of shifted products is Keras' depthwise convolution, on this process's backend."""
    from convnext_zoo.layers import shifted_depthwise_conv

    sides = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    x = rng.standard_normal(shape).astype("float32")
    kernel = rng.standard_normal(sides + (shape[-1], 1)).astype("float32")
    expected = keras.ops.depthwise_conv(x, kernel, strides=1, padding=padding)
    out = shifted_depthwise_conv(x, kernel, padding)
    assert out.shape == expected.shape
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), keras.ops.convert_to_numpy(expected),
                               rtol=1e-5, atol=1e-5)


def test_shifted_depthwise_conv_rejects_other_padding():
    from convnext_zoo.layers import shifted_depthwise_conv

    with pytest.raises(ValueError, match="Received: padding='causal'"):
        shifted_depthwise_conv(np.ones((1, 4, 4, 2), "float32"), np.ones((3, 3, 2, 1), "float32"), "causal")


@pytest.mark.parametrize("keras_class, ours_class, args, kwargs, input_shape", [
    (keras.layers.DepthwiseConv2D, DepthwiseConv2D, (7,), {"padding": "same"}, (9, 9, 4)),
    (keras.layers.Conv2D, Conv2D, (6, 4), {"strides": 4}, (8, 8, 3)),
], ids=["depthwise", "patch"])
def test_conv_layers_load_weights_of_the_keras_layer(keras_class, ours_class, args, kwargs, input_shape, rng,
                                                      tmp_path):
    """Same variables and paths as the Keras layer of the same name: files of either load into the other
    (`.weights.h5` files variables under the class name)."""
    def model(layer_class):
        inputs = keras.Input(input_shape)
        return keras.Model(inputs, layer_class(*args, **kwargs, name="conv")(inputs))

    keras_model, ours = model(keras_class), model(ours_class)
    keras_model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in keras_model.get_weights()])
    assert [v.path for v in ours.weights] == [v.path for v in keras_model.weights]
    keras_model.save_weights(tmp_path / "conv.weights.h5")
    ours.load_weights(tmp_path / "conv.weights.h5")
    x = rng.standard_normal((2, *input_shape)).astype("float32")
    np.testing.assert_array_equal(ours.predict(x, verbose=0), keras_model.predict(x, verbose=0))


@pytest.mark.parametrize("shape, kernel_size, padding", DEPTHWISE_CASES)
def test_depthwise_kernel_gradient_forms_are_the_convolutions(shape, kernel_size, padding, rng):
    """Both forms of the depthwise kernel's written-out gradient on JAX (tap by tap, Gram matrices) give
    the gradient JAX takes of its own grouped convolution: same, valid, non-square and 1x1 kernels, maps
    narrower than the kernel."""
    import jax

    from convnext_zoo.layers import _kernel_gradient_by_gram, _kernel_gradient_by_taps, _paddings

    sides = (kernel_size,) * 2 if isinstance(kernel_size, int) else kernel_size
    rows, columns = _paddings(sides, padding)
    x = rng.standard_normal(shape).astype("float32")

    def convolution(kernel):
        return jax.lax.conv_general_dilated(
            x, kernel[:, :, None, :], (1, 1), [tuple(rows), tuple(columns)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=shape[-1])

    outputs, vjp = jax.vjp(convolution, rng.standard_normal((*sides, shape[-1])).astype("float32"))
    upstream = rng.standard_normal(outputs.shape).astype("float32")
    expected = np.asarray(vjp(upstream)[0])
    padded = np.pad(x, [[0, 0], rows, columns, [0, 0]])
    for form in (_kernel_gradient_by_taps, _kernel_gradient_by_gram):
        got = np.asarray(jax.jit(form, static_argnums=(2, 3))(padded, upstream, *sides))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=form.__name__)


@pytest.mark.parametrize("shape, form", [
    ((32, 56, 56, 40), "gram"),    # V2 atto's first stage at batch 32
    ((32, 28, 28, 80), "gram"),    # ... its second
    ((8, 96, 96, 40), "gram"),     # 384 px
    ((32, 14, 14, 160), "taps"),   # 4 MiB: stays in cache
    ((1, 56, 56, 96), "taps"),     # batch 1
    ((2, 128, 128, 96), "taps"),   # 12 MiB, but each Gram matrix sums only 256 products
    ((2, 192, 192, 40), "taps"),   # 768 px: too wide, the Gram matrices cost more than they save
    ((64, 7, 7, 1024), "taps"),    # as narrow as the kernel
])
def test_depthwise_kernel_gradient_takes_gram_matrices_for_large_maps_of_moderate_width(shape, form):
    from convnext_zoo import layers

    expected = {"gram": layers._kernel_gradient_by_gram, "taps": layers._kernel_gradient_by_taps}[form]
    assert layers._kernel_gradient_form(shape, 7) is expected, (shape, form)


def test_exact_gelu_on_jax_and_its_written_derivative_are_torchs(rng):
    """`layers._exact_gelu_jax` (the flat matmuls' GELU when training on JAX) against torch's exact GELU
    and the gradient torch takes of it, far into both tails; it keeps a low-precision input's dtype."""
    import jax
    import jax.numpy as jnp
    import torch

    from convnext_zoo.layers import _exact_gelu_jax

    gelu = _exact_gelu_jax()
    x = np.concatenate([np.linspace(-12, 12, 4001), rng.standard_normal(4000) * 3]).astype("float32")
    upstream = rng.standard_normal(x.shape).astype("float32")
    outputs, vjp = jax.vjp(gelu, jnp.asarray(x))
    reference_input = torch.from_numpy(x).requires_grad_()
    reference = torch.nn.functional.gelu(reference_input)
    reference.backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(np.asarray(outputs), reference.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(upstream))[0]), reference_input.grad.numpy(),
                               rtol=1e-5, atol=1e-6)
    half = jnp.asarray(x[:16], dtype="bfloat16")
    assert gelu(half).dtype == jax.grad(lambda v: gelu(v).astype("float32").sum())(half).dtype == jnp.bfloat16


_DEPTHWISE_ON_JAX = """
import json, sys
import jax, keras
import numpy as np
import convnext_zoo
from convnext_zoo.layers import Conv2D, DepthwiseConv2D, export_forms

assert keras.config.backend() == "jax" and jax.default_backend() == "cpu"
cases, max_taps, patch_cases, part = json.loads(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[4]), sys.argv[5]
rng = np.random.default_rng(0)


def primitives(traced):
    # Every primitive of a traced function (`jax.make_jaxpr`), inside nested jaxprs too.
    names = set()

    def walk(jaxpr):
        for equation in jaxpr.eqns:
            names.add(equation.primitive.name)
            if equation.primitive.name == "cond":
                # The shifted sum's conditional: a finite kernel takes the last branch (the sum), the
                # other one (XLA's convolution) is for a kernel with an infinity or NaN.
                walk(equation.params["branches"][-1].jaxpr)
                continue
            for value in equation.params.values():
                for inner in value if isinstance(value, (list, tuple)) else [value]:
                    if hasattr(inner, "jaxpr"):
                        walk(getattr(inner.jaxpr, "jaxpr", inner.jaxpr))
                    elif hasattr(inner, "eqns"):
                        walk(inner)

    walk(traced.jaxpr)
    return names


def dot_operand_ranks(traced):
    # The rank of the left operand of every matmul of a traced function.
    return {len(e.invars[0].aval.shape) for e in traced.jaxpr.eqns if e.primitive.name == "dot_general"}


def outputs_and_gradients(layer, values, x, standard, training=False):
    def loss(values, x):
        def run():
            y, _ = layer.stateless_call(values, [], x, **({"training": True} if training else {}))
            return y
        if standard:
            with export_forms():
                y = run()
        else:
            y = run()
        # A weighted sum: every output position gets its own upstream gradient.
        return keras.ops.sum(y * keras.ops.sin(keras.ops.arange(y.size, dtype="float32")).reshape(y.shape)), y

    function = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y), (d_values, d_x) = function(values, x)
    traced = jax.make_jaxpr(lambda v, x: loss(v, x)[1])(values, x)  # the forward pass, traced once
    return y, d_values, d_x, primitives(traced), dot_operand_ranks(traced)


def close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1.0, float(np.abs(b).max()))
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert float(np.abs(a - b).max()) <= 2e-5 * scale, (what, float(np.abs(a - b).max()), scale)


# 1. The layer against the convolution: outputs and gradients, and which form ran.
for shape, kernel_size, padding, strides in cases:
    layer = DepthwiseConv2D(kernel_size, strides=strides, padding=padding, bias_initializer="random_normal")
    layer.build(tuple(shape))
    values = [rng.standard_normal(v.shape).astype("float32") for v in layer.trainable_variables]
    x = rng.standard_normal(shape).astype("float32")
    fast = outputs_and_gradients(layer, values, x, standard=False)
    standard = outputs_and_gradients(layer, values, x, standard=True)
    close(fast[0], standard[0], ("outputs", shape, kernel_size))
    for a, b in zip(fast[1], standard[1]):
        close(a, b, ("variable gradient", shape, kernel_size))
    close(fast[2], standard[2], ("input gradient", shape, kernel_size))
    sides = (kernel_size,) * 2 if isinstance(kernel_size, int) else kernel_size
    shifted = strides == 1 and sides[0] * sides[1] <= max_taps
    assert ("conv_general_dilated" in standard[3]), standard[3]
    assert ("conv_general_dilated" not in fast[3]) == shifted, (shape, kernel_size, strides, fast[3])

# 1a. XLA computes the shifted sum once: a layer norm after it reads the sum's output instead of
# computing the 49 products again inside its own fusion (the conditional around the sum does that).
# Each product but the centre one slices a window of the padded input with the output's shape (the
# centre window is the input itself); without the conditional, XLA slices 3 x 48 windows here.
if part == "layers":
    block = keras.Sequential([keras.Input((9, 9, 4)), DepthwiseConv2D(7, padding="same"),
                              keras.layers.LayerNormalization(epsilon=1e-6)])
    values = [rng.standard_normal(v.shape).astype("float32") for v in block.trainable_variables]
    x = rng.standard_normal((2, 9, 9, 4)).astype("float32")
    forward = jax.jit(lambda values, x: block.stateless_call(values, [], x)[0])
    module = forward.lower(values, x).compile().as_text()
    windows = module.count("f32[2,9,9,4]{3,2,1,0} slice(")
    assert windows == 7 * 7 - 1, windows
    # A kernel with an infinity or NaN takes XLA's convolution: the same infinities and NaNs.
    values[0][3, 3, 1, 0], values[0][0, 6, 2, 0] = np.inf, np.nan
    with export_forms():
        standard = np.asarray(jax.jit(lambda values, x: block.stateless_call(values, [], x)[0])(values, x))
    np.testing.assert_array_equal(np.asarray(forward(values, x)), standard)

# 1b. The kernel-is-stride convolution against the convolution, the same way.
for shape, filters, kernel_size, strides, padding, patches in patch_cases:
    layer = Conv2D(filters, kernel_size, strides=strides, padding=padding, bias_initializer="random_normal")
    layer.build(tuple(shape))
    values = [rng.standard_normal(v.shape).astype("float32") for v in layer.trainable_variables]
    x = rng.standard_normal(shape).astype("float32")
    fast = outputs_and_gradients(layer, values, x, standard=False)
    standard = outputs_and_gradients(layer, values, x, standard=True)
    close(fast[0], standard[0], ("patch outputs", shape, kernel_size, strides))
    for a, b in zip(fast[1], standard[1]):
        close(a, b, ("patch variable gradient", shape, kernel_size, strides))
    close(fast[2], standard[2], ("patch input gradient", shape, kernel_size, strides))
    assert ("conv_general_dilated" not in fast[3]) == patches, (shape, kernel_size, strides, fast[3])

# 2. A whole model, shifted against the convolution (V2: GRN; 64 px: lowered strides, 2-8 px maps),
# then saved and loaded: the .keras file rebuilds the same model.
if part == "model":
    image_size = 64
    backbone = convnext_zoo.ConvNeXtBackbone(
        depths=(1, 1, 1, 1), hidden_dims=(8, 16, 24, 32), use_grn=True,
        layer_scale_init_value=None, image_shape=(image_size, image_size, 3))
    values = [(rng.standard_normal(v.shape) * (0.5 if len(v.shape) == 1 else 1 / np.sqrt(np.prod(v.shape[:-1])))
               + (1.0 if len(v.shape) == 1 else 0.0)).astype("float32") for v in backbone.trainable_variables]
    x = rng.standard_normal((2, image_size, image_size, 3)).astype("float32")
    # Inference, then training: PointwiseDense flattens its input to 2-D for a gradient only.
    for training in (False, True):
        fast = outputs_and_gradients(backbone, values, x, standard=False, training=training)
        standard = outputs_and_gradients(backbone, values, x, standard=True, training=training)
        assert standard[4] == {4}, standard[4]  # Keras' Dense: products over 4-D inputs
        assert fast[4] == ({2} if training else {4, 2}), (training, fast[4])  # and 2-D patches
        # Keras' exact GELU is jax.nn.gelu's erfc form; the flat matmuls take the erf form (training).
        assert "erfc" in standard[3] and ("erfc" in fast[3]) != training, (training, fast[3])
        close(fast[0], standard[0], ("model outputs", image_size, training))
        for a, b, v in zip(fast[1], standard[1], backbone.trainable_variables):
            close(a, b, ("model gradient", image_size, training, v.path))
    # At 64 px the last downsampling is lowered to stride 1 ("same"): a convolution still.
    assert "conv_general_dilated" in fast[3]

    for variable, value in zip(backbone.trainable_variables, values):
        variable.assign(value)
    backbone.save(sys.argv[3])
    loaded = keras.saving.load_model(sys.argv[3])
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(backbone(x)))
print("ok", len(cases), len(patch_cases))
"""


# (input shape, filters, kernel, strides, padding, runs as patches x matrix on JAX's CPU)
PATCH_CASES = [
    [[2, 16, 16, 3], 8, 4, 4, "valid", True],     # the patchify stem
    [[2, 9, 11, 5], 6, 2, 2, "valid", True],      # odd sides: the last row and column are dropped
    [[1, 8, 8, 4], 4, 2, 1, "same", False],       # a lowered downsampling: the convolution
    [[2, 9, 9, 3], 4, 3, 2, "valid", False],      # kernel larger than stride: the convolution
]


def _run_on_jax(part, tmp_path):
    """Runs `_DEPTHWISE_ON_JAX` with KERAS_BACKEND=jax: the layer cases ("layers") or the whole model ("model")."""
    cases = [[list(shape), kernel_size, padding, 1] for shape, kernel_size, padding in DEPTHWISE_CASES]
    cases += [
        [[1, 16, 16, 2], 13, "same", 1],   # 169 taps: above SHIFTED_MAX_TAPS, the convolution
        [[2, 9, 9, 3], 7, "same", 2],      # strided: the convolution
        [[4, 96, 96, 48], 7, "same", 1],   # 6.75 MiB: the kernel's gradient as Gram matrices
    ]
    patch_cases = PATCH_CASES
    if part == "model":
        cases = patch_cases = []
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", _DEPTHWISE_ON_JAX, json.dumps(cases), str(SHIFTED_MAX_TAPS),
         str(tmp_path / "backbone.keras"), json.dumps(patch_cases), part],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split(), len(cases)


def test_convolutions_on_jax_take_their_cpu_forms_and_match_the_convolution(tmp_path):
    """On JAX's CPU the depthwise convolution runs as shifted products and the
    kernel-is-stride convolutions as patches x matrix: outputs and gradients equal the convolution's.

    In a process of its own with KERAS_BACKEND=jax. For each case the jitted
    layer and its gradients (input, kernel, bias) match the same layer inside
    `export_forms()` (Keras' convolution), and the traced program holds a
    convolution exactly where the fast form does not apply (strides or more
    than `SHIFTED_MAX_TAPS` taps for `DepthwiseConv2D`; a kernel other than
    the stride or "same" padding for `Conv2D`).
    """
    printed, count = _run_on_jax("layers", tmp_path)
    assert printed == ["ok", str(count), str(len(PATCH_CASES))], printed


@pytest.mark.slow  # about 35 s: four whole-model compilations and a .keras round trip on JAX
def test_a_model_on_jax_takes_the_cpu_forms_in_inference_and_training(tmp_path):
    """A small V2 backbone at 64 px (lowered strides: 2-8 px feature maps in the late stages) gives
    the same outputs and gradients as with Keras' forms, in inference and in training; its matmuls
    take 4-D and 2-D operands in inference and only 2-D ones in training (`PointwiseDense`
    flattens for a gradient), and it survives a `.keras` round trip."""
    printed, _ = _run_on_jax("model", tmp_path)
    assert printed == ["ok", "0", "0"], printed


# === ScaleNorm (timm's SimpleNorm and RMS norm) and ExactGelu ===


def test_scale_norm_rms_equals_keras_rms_normalization(rng):
    x = (rng.normal(size=(2, 5, 4, 24)) * 3 + 1).astype("float32")
    gamma = rng.normal(size=(24,)).astype("float32")
    ours = ScaleNorm("mean_square", epsilon=1e-3)
    reference = keras.layers.RMSNormalization(epsilon=1e-3)
    ours.build(x.shape)
    reference.build(x.shape)
    ours.gamma.assign(gamma)
    reference.scale.assign(gamma)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-5)


def test_scale_norm_variance_is_the_unbiased_uncentred_simple_norm(rng):
    """x / sqrt(var_{n-1}(x) + eps) * gamma: x is not centred, the variance is unbiased."""
    x = (rng.normal(size=(3, 4, 16)) * 2 + 0.7).astype("float32")
    gamma = rng.normal(size=(16,)).astype("float32")
    layer = ScaleNorm("variance", epsilon=1e-2)
    layer.build(x.shape)
    layer.gamma.assign(gamma)
    expected = x / np.sqrt(x.var(axis=-1, ddof=1, keepdims=True) + 1e-2) * gamma
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # A biased variance or a centred output would be visibly different here.
    assert np.abs(expected - x / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-2) * gamma).max() > 1e-2
    with pytest.raises(ValueError, match="statistic='std'.*mean_square, variance"):
        ScaleNorm("std")


def test_scale_norm_reduces_in_float32_under_float16(rng):
    x = (rng.normal(size=(1, 2, 2, 64)) * 300).astype("float16")
    layer = ScaleNorm("mean_square", dtype="mixed_float16")
    out = np.asarray(layer(x))
    assert out.dtype == np.float16 and np.isfinite(out).all()


def test_exact_gelu_export_form_matches(rng):
    import tensorflow as tf

    x = tf.constant((rng.normal(size=(2, 9, 9, 4)) * 3).astype("float32"))
    layer = ExactGelu()
    fast = tf.function(lambda t: layer(t)).get_concrete_function(x)
    with export_forms():
        portable = tf.function(lambda t: layer(t)).get_concrete_function(x)
    assert "Erf" in {op.type for op in portable.graph.get_operations()}
    expected = np.asarray(keras.activations.gelu(x, approximate=False))
    np.testing.assert_allclose(portable(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast(x).numpy(), expected, rtol=1e-6, atol=1e-6)
