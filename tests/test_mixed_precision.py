"""Mixed precision (`--dtype mixed_float16 | mixed_bfloat16`): norms reduce in float32, training stays finite.

The unit tests feed GRN and the layer norms activations whose squares
overflow float16 (max 65504): a reduction in float16 gives inf / NaN, one
in float32 gives the float32 result rounded to the output dtype. The
training tests run this package's optimizer (the recipe's LayerDecayAdamW
with EMA, under Keras' LossScaleOptimizer for float16) on crops of real
photographs and check every step's loss and every weight.
"""

import contextlib

import numpy as np
import pytest

import keras

import convnext_zoo
from convnext_zoo import layers, recipes, training
from tests.conftest import photo
from tests.run_helpers import SHALLOW_V2

POLICIES = ("mixed_float16", "mixed_bfloat16")


@contextlib.contextmanager
def dtype_policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _large_activations(shape, seed=0):
    # Values around +-400: squares near 1.6e5, beyond float16's 65504.
    rng = np.random.default_rng(seed)
    return (400.0 * rng.uniform(0.5, 1.0, shape) * rng.choice([-1.0, 1.0], shape)).astype("float32")


def _compare(layer_cls, policy, inputs, **kwargs):
    reference = layer_cls(dtype="float32", **kwargs)
    expected = np.asarray(reference(inputs), "float32")
    mixed = layer_cls(dtype=policy, **kwargs)
    mixed.build(inputs.shape)
    for variable, value in zip(mixed.weights, reference.get_weights()):
        variable.assign(value)
    assert all(v.dtype == "float32" for v in mixed.weights)  # variables stay float32
    half = keras.ops.cast(inputs, mixed.compute_dtype)
    outputs = mixed(half)
    assert keras.backend.standardize_dtype(outputs.dtype) == mixed.compute_dtype
    got = np.asarray(keras.ops.cast(outputs, "float32"))
    assert np.isfinite(got).all()
    # The only differences are the input and output roundings to 16 bits.
    tolerance = 1e-2 if policy == "mixed_bfloat16" else 2e-3
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= tolerance * scale, (layer_cls.__name__, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_grn_reduces_in_float32(policy, rng):
    inputs = _large_activations((2, 6, 6, 16))
    grn = layers.GlobalResponseNorm
    _compare(grn, policy, inputs)
    # gamma / beta away from zero so the normalised term counts.
    reference = grn(dtype="float32")
    reference.build(inputs.shape)
    reference.set_weights([rng.normal(size=16).astype("float32"), rng.normal(size=16).astype("float32")])
    mixed = grn(dtype=policy)
    mixed.build(inputs.shape)
    mixed.set_weights(reference.get_weights())
    expected = np.asarray(reference(inputs))
    got = np.asarray(keras.ops.cast(mixed(keras.ops.cast(inputs, mixed.compute_dtype)), "float32"))
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()


@pytest.mark.parametrize("policy", POLICIES)
def test_layer_norms_reduce_in_float32(policy):
    inputs = _large_activations((2, 5, 5, 32), seed=1)
    # A per-channel offset larger than the spread: variance in float16 would
    # cancel catastrophically as well as overflow.
    inputs = inputs + np.linspace(-300, 300, 32, dtype="float32")
    _compare(layers.PointwiseLayerNorm, policy, inputs, epsilon=1e-6)


def _photo_crops(size=32, per_photo=4):
    """Crops of four photographs, labelled by photograph (one-hot)."""
    images, labels = [], []
    for label, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        image = photo(name, size=(4 * size, 4 * size))
        for i in range(per_photo):
            row, col = divmod(i, 2)
            crop = image[row * 2 * size: (row * 2 + 2) * size: 2, col * 2 * size: (col * 2 + 2) * size: 2]
            images.append(crop)
            labels.append(label)
    images = np.stack(images).astype("float32") / 127.5 - 1.0
    return images, np.eye(4, dtype="float32")[labels]


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def _train(preset, policy, steps, batch=4):
    images, labels = _photo_crops()
    with dtype_policy(policy):
        plan = recipes.scale_recipe("small_from_scratch", "atto", epochs=1, batch_size=batch,
                                    steps_per_epoch=steps, family="v2")
        if preset == "shallow_v2":
            backbone = convnext_zoo.ConvNeXtBackbone(
                **SHALLOW_V2, drop_path_rate=0.1, image_shape=images.shape[1:])
            model = convnext_zoo.ConvNeXtImageClassifier(backbone, num_classes=4)
        else:
            model = convnext_zoo.from_preset(
                preset, num_classes=4, input_shape=images.shape[1:], load_weights=False,
                preprocessing=False, drop_path_rate=0.1)
        model.compile(optimizer=training.make_optimizer(model, plan), loss=training.make_loss(plan))
        losses = StepLosses()
        repeats = -(-steps * batch // len(images))
        x, y = np.concatenate([images] * repeats), np.concatenate([labels] * repeats)
        model.fit(x[: steps * batch], y[: steps * batch], batch_size=batch, epochs=1, shuffle=True,
                  verbose=0, callbacks=[losses])
    return model, np.array(losses.losses)


def _check_run(model, losses, policy, steps):
    assert len(losses) == steps
    assert np.isfinite(losses).all(), losses[~np.isfinite(losses)][:5]
    for variable in model.weights:
        assert np.isfinite(np.asarray(keras.ops.convert_to_tensor(variable))).all(), variable.path
    wrapped = type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert wrapped == (policy == "mixed_float16")  # loss scaling only where float16 needs it
    assert model.backbone.compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in model.trainable_weights)
    assert losses[-steps // 5:].mean() < losses[: steps // 5].mean()  # it learned


def test_short_float16_run_is_finite_with_loss_scaling():
    """The default suite's check, on a shallow V2 (GRN, no layer scale); full V2 atto in both policies
    and V1 tiny run longer in the slow group. V2 atto's 20 float16 steps took 167 s with oneDNN on."""
    model, losses = _train("shallow_v2", "mixed_float16", steps=20)
    _check_run(model, losses, "mixed_float16", steps=20)


@pytest.mark.slow
@pytest.mark.parametrize("preset,steps", [("convnext_v2_atto", 200), ("convnext_v1_tiny", 60)])
@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_precision_training_stays_finite(preset, steps, policy):
    """200 steps of V2 atto in both mixed policies; V1's code path (layer scale) for 60 steps of V1 tiny.

    V1 tiny's steps cost 3x atto's on a CPU without 16-bit matmuls (274 s for
    200 bfloat16 steps on an AVX2 EPYC); float16's loss scale finds its level
    in the first steps, which 60 cover.
    """
    model, losses = _train(preset, policy, steps=steps)
    _check_run(model, losses, policy, steps=steps)


@pytest.mark.parametrize("policy", ("float32", *POLICIES))
def test_pointwise_dense_takes_the_fused_matmul_form_in_float32_only(policy):
    """oneDNN's fused 2-D MatMul + BiasAdd in float16 is a slow path (a V2 atto
    float16 training step took about 5 s instead of 0.27 s on an AVX-512 Xeon;
    benchmarks/mixed_precision_step.py): under a mixed policy `PointwiseDense`
    must take Dense's own form."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("the 2-D form exists on TensorFlow only")
    import tensorflow as tf

    layer = layers.PointwiseDense(16, activation="gelu", dtype=policy)
    inputs = tf.ones((2, 5, 5, 8), layer.compute_dtype)
    layer.build(inputs.shape)
    graph = tf.function(layer).get_concrete_function(inputs).graph
    # The pattern oneDNN's rewrite fuses: a BiasAdd straight on a 2-D MatMul.
    fusable = [op for op in graph.get_operations()
               if op.type == "BiasAdd" and op.inputs[0].op.type == "MatMul"]
    assert bool(fusable) == (policy == "float32"), [op.get_attr("T") for op in fusable]
    reference = keras.layers.Dense(16, activation="gelu", dtype=policy)
    reference.build(inputs.shape)
    reference.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(tf.cast(layer(inputs), "float32")),
                               np.asarray(tf.cast(reference(inputs), "float32")), rtol=1e-6, atol=1e-6)
