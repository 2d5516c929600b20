"""The factories, the backbone and the classifier (TensorFlow backend)."""

import json

import keras
import keras_hub
import numpy as np
import pytest

import convnext_zoo
from convnext_zoo import (
    ConvNeXtBackbone,
    ConvNeXtImageClassifier,
    create_convnext_v1,
    create_convnext_v2,
)
from convnext_zoo.layers import DropPath, LayerScale
from tests.conftest import photo

# Reference parameter counts (shared/reference/convnext.md, section 1):
# (with a 1000-class head, without the head, with a 21841-class head).
PARAMS = {
    ("v2", "atto"): (3_708_400, 3_387_400, None),
    ("v2", "femto"): (5_233_240, 4_848_240, None),
    ("v2", "pico"): (9_066_280, 8_553_280, None),
    ("v2", "nano"): (15_623_800, 14_982_800, None),
    ("v1", "tiny"): (28_589_128, 27_820_128, 44_615_857),
    ("v2", "tiny"): (28_635_496, 27_866_496, None),
    ("v1", "small"): (50_223_688, 49_454_688, 66_250_417),
    ("v1", "base"): (88_591_464, 87_566_464, 109_953_489),
    ("v2", "base"): (88_717_800, 87_692_800, None),
    ("v1", "large"): (197_767_336, 196_230_336, 229_799_953),
    ("v2", "large"): (197_956_840, 196_419_840, None),
    ("v1", "xlarge"): (350_196_968, 348_147_968, 392_900_177),
    ("v2", "huge"): (660_289_640, 657_472_640, None),
}
LARGEST = {("v1", "large"), ("v2", "large"), ("v1", "xlarge"), ("v2", "huge")}
FACTORIES = {"v1": create_convnext_v1, "v2": create_convnext_v2}


def _param_cases():
    return [pytest.param(*key, marks=[pytest.mark.slow] if key in LARGEST else [], id="-".join(key))
            for key in PARAMS]


# Where the headless and 21841-class models are built too (elsewhere their counts follow from the
# classifier's and its head's width: building costs seconds per variant).
BUILT_EVERY_WAY = {("v2", "atto"), ("v1", "tiny")}


@pytest.mark.parametrize("family,variant", _param_cases())
def test_parameter_counts_match_the_reference(family, variant):
    with_head, without_head, with_22k = PARAMS[(family, variant)]
    create = FACTORIES[family]
    # Parameter counts do not depend on the input size: 64 px builds faster.
    shape = (64, 64, 3)
    model = create(variant, input_shape=shape)
    assert model.count_params() == with_head
    width = model.get_layer("head_fc").kernel.shape[0]
    assert with_head - without_head == (width + 1) * 1000
    if with_22k:
        assert with_22k - without_head == (width + 1) * 21841
    if (family, variant) in BUILT_EVERY_WAY:
        assert create(variant, include_top=False, pooling="avg", input_shape=shape).count_params() == without_head
        if with_22k:
            assert create(variant, num_classes=21841, input_shape=shape).count_params() == with_22k
    del model
    keras.backend.clear_session()


def test_factories_return_keras_hub_models():
    model = create_convnext_v2("atto", num_classes=7, input_shape=(64, 64, 3))
    assert isinstance(model, ConvNeXtImageClassifier)
    assert isinstance(model, keras_hub.models.ImageClassifier)
    assert isinstance(model.backbone, ConvNeXtBackbone)
    assert isinstance(model.backbone, keras_hub.models.FeaturePyramidBackbone)
    assert model.name == "convnext_v2_atto"
    assert model.output.shape == (None, 7)
    # The head is pool -> LayerNorm -> Dense, in that order.
    head = [layer.name for layer in model.layers[2:]]
    assert head == ["head_global_pool", "head_norm", "head_drop", "head_fc"]
    backbone = create_convnext_v1("tiny", include_top=False, input_shape=(64, 64, 3))
    assert isinstance(backbone, ConvNeXtBackbone)
    assert convnext_zoo.convnext_v1.create_convnext_v1 is create_convnext_v1
    assert convnext_zoo.convnext_v2.create_convnext_v2 is create_convnext_v2


def test_uses_depthwise_convolutions_not_grouped_ones():
    backbone = create_convnext_v2("atto", include_top=False, input_shape=(64, 64, 3))
    depthwise = [l for l in backbone.layers if isinstance(l, keras.layers.DepthwiseConv2D)]
    assert len(depthwise) == sum(backbone.depths)
    grouped = [
        l for l in backbone.layers
        if isinstance(l, keras.layers.Conv2D) and getattr(l, "groups", 1) > 1
    ]
    assert grouped == []


@pytest.mark.parametrize(
    "family,variant,size,expected",
    [
        ("v1", "tiny", 256, [(64, 64, 96), (32, 32, 192), (16, 16, 384), (8, 8, 768)]),
        ("v2", "atto", 224, [(56, 56, 40), (28, 28, 80), (14, 14, 160), (7, 7, 320)]),
        pytest.param(
            "v1", "large", 256,
            [(64, 64, 192), (32, 32, 384), (16, 16, 768), (8, 8, 1536)],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_feature_map_and_pyramid_shapes(family, variant, size, expected):
    backbone = FACTORIES[family](variant, include_top=False, input_shape=(size, size, 3))
    assert backbone.output.shape == (None,) + expected[-1]
    pyramid = backbone.pyramid_outputs
    assert list(pyramid) == ["P2", "P3", "P4", "P5"]
    assert [tuple(t.shape[1:]) for t in pyramid.values()] == expected
    assert pyramid["P5"] is backbone.output
    extractor = keras.Model(backbone.inputs, pyramid)
    out = extractor(np.zeros((1, size, size, 3), "float32"))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == dict(zip(pyramid, expected))


def test_pooling_options_without_top(rng):
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    kw = dict(include_top=False, input_shape=(64, 64, 3))
    keras.utils.set_random_seed(1)
    avg = create_convnext_v2("atto", pooling="avg", **kw)
    maxed = create_convnext_v2("atto", pooling="max", **kw)
    maxed.set_weights(avg.get_weights())
    assert avg.output.shape == (None, 320)
    features = keras.ops.convert_to_numpy(avg.backbone(x))
    norm = avg.get_layer("head_norm")

    def layer_norm(v):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        gamma, beta = (keras.ops.convert_to_numpy(w) for w in norm.weights)
        return (v - mu) / np.sqrt(var + 1e-6) * gamma + beta

    np.testing.assert_allclose(avg.predict(x, verbose=0), layer_norm(features.mean((1, 2))), atol=1e-4)
    np.testing.assert_allclose(maxed.predict(x, verbose=0), layer_norm(features.max((1, 2))), atol=1e-4)


@pytest.mark.parametrize(
    "size,final",
    [(32, 4), (48, 6), (96, 6), (127, 7), (128, 4), (224, 7)],
)
def test_small_inputs_are_not_over_downsampled(size, final):
    backbone = create_convnext_v2("atto", include_top=False, input_shape=(size, size, 3))
    assert backbone.output.shape == (None, final, final, 320)


def test_small_input_rule_keeps_weight_shapes_and_can_be_switched_off(rng):
    adapted = create_convnext_v1("tiny", num_classes=10, input_shape=(32, 32, 3))
    plain = create_convnext_v1("tiny", num_classes=10, input_shape=(32, 32, 3), adapt_small_inputs=False)
    reference = create_convnext_v1("tiny", num_classes=10, input_shape=(224, 224, 3))
    assert adapted.backbone.strides == (4, 2, 1, 1)
    assert plain.backbone.strides == (4, 2, 2, 2)
    assert plain.backbone.output.shape == (None, 1, 1, 768)
    shapes = [tuple(w.shape) for w in reference.weights]
    assert [tuple(w.shape) for w in adapted.weights] == shapes
    # Weights of a standard-resolution model load unchanged into an adapted one.
    adapted.set_weights(reference.get_weights())
    out = adapted.predict(rng.normal(size=(2, 32, 32, 3)).astype("float32"), verbose=0)
    assert out.shape == (2, 10) and np.isfinite(out).all()


def test_variable_input_size_and_other_channel_counts(rng):
    model = create_convnext_v2("atto", num_classes=4, input_shape=(None, None, 3))
    for shape in [(1, 64, 64, 3), (1, 200, 264, 3), (1, 97, 131, 3)]:
        assert model.predict(rng.normal(size=shape).astype("float32"), verbose=0).shape == (1, 4)
    gray = create_convnext_v2("atto", num_classes=4, input_shape=(64, 64, 1))
    assert gray.get_layer("convnext_v2_atto_backbone").get_layer("stem_0").kernel.shape == (4, 4, 1, 40)
    multispectral = create_convnext_v2("atto", include_top=False, input_shape=(64, 64, 13))
    assert multispectral.output.shape == (None, 4, 4, 320)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: create_convnext_v1("tinyy"), r"variant='tinyy'\. Did you mean 'tiny'\?.*Valid: tiny, small, base, large, xlarge"),
        (lambda: create_convnext_v2("tiny2"), r"Did you mean 'tiny'"),
        (lambda: create_convnext_v2("xlarge"), r"V2 variant.*'xlarge'.*Valid: atto, femto"),
        (lambda: create_convnext_v1(num_classes=0), r"num_classes=0.*include_top=False"),
        (lambda: create_convnext_v1(num_classes=-3), r"num_classes=-3"),
        (lambda: create_convnext_v2(include_top=False, pooling="mean"), r"pooling='mean'.*Valid: None, 'avg', 'max'"),
        (lambda: create_convnext_v2(input_shape=(16, 16, 3)), r"at least 32 px.*image_shape=\(16, 16, 3\)"),
        (lambda: create_convnext_v2(input_shape=(224, 224)), r"input_shape=\(224, 224\)"),
        (lambda: create_convnext_v2(drop_path_rate=-0.1), r"drop_path_rate=-0.1"),
        (lambda: create_convnext_v2(drop_path_rate=1.5), r"drop_path_rate=1.5"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_unknown_keyword_is_a_type_error_listing_the_accepted_ones():
    with pytest.raises(TypeError, match=r"layer_scale_init_value.*accepted: adapt_small_inputs"):
        create_convnext_v2(layer_scale_init_value=1e-6)


def test_training_behaviour_drop_path_layer_scale_head_init(rng):
    model = create_convnext_v1(
        "tiny", num_classes=5, input_shape=(64, 64, 3), drop_path_rate=0.4,
        layer_scale_init_value=0.5, head_init_scale=0.001,
    )
    rates = [l.rate for l in model.backbone.layers if isinstance(l, DropPath)]
    # Linear from 0 over all 18 blocks; the first block has rate 0 (no layer).
    np.testing.assert_allclose(rates, np.linspace(0, 0.4, 18)[1:], rtol=1e-6)
    scales = [l for l in model.backbone.layers if isinstance(l, LayerScale)]
    assert len(scales) == 18
    assert all(np.allclose(keras.ops.convert_to_numpy(l.gamma), 0.5) for l in scales)
    head = keras.ops.convert_to_numpy(model.get_layer("head_fc").kernel)
    assert 0.5 * 0.02 * 0.001 < head.std() < 1.5 * 0.02 * 0.001
    x = rng.normal(size=(8, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=True))
    v2 = create_convnext_v2("atto", input_shape=(64, 64, 3))
    assert not any(isinstance(l, LayerScale) for l in v2.backbone.layers)
    assert len([l for l in v2.backbone.layers if l.name.endswith("mlp_grn")]) == 12


def _randomize(model, rng, scale=1.0):
    model.set_weights([
        (rng.normal(size=w.shape) * scale * (0.5 if w.ndim == 1 else 1 / np.sqrt(np.prod(w.shape[:-1])))
         + (1.0 if w.ndim == 1 else 0.0)).astype("float32")
        for w in model.get_weights()
    ])


def test_keras_file_round_trip(tmp_path, rng):
    model = create_convnext_v1("tiny", num_classes=3, input_shape=(64, 64, 3))
    _randomize(model, rng)
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded) is ConvNeXtImageClassifier
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


def test_config_json_round_trip_and_weight_files(tmp_path, rng):
    model = create_convnext_v2("atto", num_classes=3, input_shape=(64, 64, 3), drop_path_rate=0.1)
    _randomize(model, rng)
    config = json.loads(json.dumps(model.get_config()))
    rebuilt = ConvNeXtImageClassifier.from_config(config)
    assert rebuilt.get_config() == model.get_config()
    assert [w.shape for w in rebuilt.weights] == [w.shape for w in model.weights]
    model.save_weights(tmp_path / "model.weights.h5")
    rebuilt.load_weights(tmp_path / "model.weights.h5")
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(rebuilt.predict(x, verbose=0), model.predict(x, verbose=0))
    backbone_config = json.loads(json.dumps(model.backbone.get_config()))
    assert ConvNeXtBackbone.from_config(backbone_config).count_params() == model.backbone.count_params()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_v2_stays_finite_with_large_activations(policy, rng):
    x = rng.normal(size=(2, 96, 96, 3)).astype("float32") * 50
    reference = create_convnext_v2("atto", num_classes=10, input_shape=(96, 96, 3))
    _randomize(reference, rng, scale=3.0)
    mixed = create_convnext_v2("atto", num_classes=10, input_shape=(96, 96, 3), dtype=policy)
    mixed.set_weights(reference.get_weights())
    assert mixed.backbone.get_layer("stages_0_blocks_0_mlp_grn").compute_dtype in ("float16", "bfloat16")
    out = np.asarray(mixed.predict(x, verbose=0), dtype="float32")
    assert np.isfinite(out).all()
    ref = reference.predict(x, verbose=0)
    # Half precision end to end: agree to a few percent of the logit scale.
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_fit_reduces_the_loss_on_real_photographs():
    # Learnable task: which of two photographs a random 48 px crop comes from.
    keras.utils.set_random_seed(0)
    sources = [photo("astronaut", (128, 128)), photo("coffee", (128, 128))]
    gen = np.random.default_rng(0)
    images, labels = [], []
    for i in range(32):
        top, left = gen.integers(0, 80, size=2)
        images.append(sources[i % 2][top:top + 48, left:left + 48])
        labels.append(i % 2)
    x = (np.stack(images).astype("float32") / 255.0 - 0.45) / 0.25
    y = np.array(labels)
    model = create_convnext_v2("atto", num_classes=2, input_shape=(48, 48, 3))
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=2e-3, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    model.fit(x, y, batch_size=8, epochs=6, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert after < 0.5 * before


def test_import_alone_is_enough_to_load_a_saved_model(tmp_path):
    import subprocess
    import sys

    model = create_convnext_v2("atto", num_classes=2, input_shape=(64, 64, 3))
    model.save(tmp_path / "m.keras")
    code = (
        "import sys, keras, convnext_zoo\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "print(type(m).__name__, m.count_params())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.keras")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ConvNeXtImageClassifier", str(model.count_params())]


def test_predict_of_one_batch_skips_the_pipeline_with_the_same_outputs(rng, monkeypatch, capsys):
    model = create_convnext_v2("atto", num_classes=5, input_shape=(64, 64, 3))
    backbone = model.backbone
    _randomize(model, rng)
    x = rng.normal(size=(3, 64, 64, 3)).astype("float32")
    # A callback forces Keras' own predict loop (the data pipeline).
    through_pipeline = model.predict(x, verbose=0, callbacks=[keras.callbacks.Callback()])
    features_pipeline = backbone.predict(x, verbose=0, callbacks=[keras.callbacks.Callback()])
    calls = []
    for cls in (type(model), type(backbone)):
        original = cls.predict_on_batch
        monkeypatch.setattr(
            cls, "predict_on_batch",
            lambda self, batch, _original=original: calls.append(len(batch)) or _original(self, batch),
        )
    # Float32 round-off apart: the one-batch trace runs each layer norm as
    # one oneDNN kernel (fused_layer_norms) where TensorFlow has it.
    np.testing.assert_allclose(model.predict(x), through_pipeline, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backbone.predict(x), features_pipeline, rtol=1e-5, atol=1e-5)
    assert calls == [3, 3]
    # Asking for the progress output explicitly takes Keras' loop, with its bar.
    shown = model.predict(x, verbose=1)
    assert calls == [3, 3]
    np.testing.assert_allclose(shown, through_pipeline, rtol=1e-5, atol=1e-5)
    assert "1/1" in capsys.readouterr().out
    # More samples than one batch (or a dataset) take Keras' loop, batch by batch.
    many = rng.normal(size=(5, 64, 64, 3)).astype("float32")
    out = model.predict(many, batch_size=2, verbose=0)
    assert calls == [3, 3] and out.shape == (5, 5)
    np.testing.assert_allclose(out[:3], model.predict(many[:3]), rtol=1e-5, atol=1e-5)


def test_predict_of_one_batch_fuses_the_layer_norms_and_training_does_not(rng, monkeypatch):
    """One batch through `predict` traces each layer norm as one oneDNN kernel.

    With the size threshold lifted, the 17 layer norms of V2 atto run as
    `_MklLayerNorm` in the traced predict step, with the eager model's outputs. Training afterwards traces
    its own step (the portable form, `test_layers.py`) and still trains, and
    `predict` sees the new weights.
    """
    if keras.config.backend() != "tensorflow":
        pytest.skip("a TensorFlow kernel")

    def fused_per_trace(function):
        # The graphs traced by the calls above (listing them for serialization
        # would trace anew, outside the calls' context).
        return [
            [op.type for op in concrete.graph.get_operations()].count("_MklLayerNorm")
            for concrete in function._list_all_concrete_functions()
        ]

    from convnext_zoo import layers

    monkeypatch.setattr(layers, "FUSED_MIN_VALUES", 0)  # every layer norm of this small model
    model = create_convnext_v2("atto", num_classes=5, input_shape=(64, 64, 3))
    _randomize(model, rng)
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        model.predict(x), keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )
    assert fused_per_trace(model.predict_function) == [17]
    # Training traces its own step, outside the context: it trains as before.
    history = model.fit(x, np.array([1, 3]), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_allclose(
        model.predict(x), keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )
    # Keras' own loop (more samples than a batch) traces inside the context too.
    fresh = create_convnext_v2("atto", num_classes=5, input_shape=(64, 64, 3))
    fresh.set_weights(model.get_weights())
    many = rng.normal(size=(3, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        fresh.predict(many, batch_size=2, verbose=0), keras.ops.convert_to_numpy(model(many)),
        rtol=1e-5, atol=1e-5,
    )
    traces = fused_per_trace(fresh.predict_function)
    assert traces and set(traces) == {17}, traces


def test_predict_of_one_batch_runs_the_attached_preprocessing(rng):
    from convnext_zoo.build import attach_preprocessing as attach_preprocessor
    from convnext_zoo.readers import registry_config
    from convnext_zoo.registry import preset_info

    model = create_convnext_v2("atto", num_classes=4, input_shape=(64, 64, 3))
    _randomize(model, rng)
    attach_preprocessor(model, registry_config(preset_info("convnext_v2_atto_imagenet")), (64, 64, 3))
    images = np.stack([photo("astronaut", (80, 80)), photo("coffee", (80, 80))])
    fast = model.predict(images)
    slow = model.predict(images, verbose=0, callbacks=[keras.callbacks.Callback()])
    assert fast.shape == (2, 4)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


def test_conv_initializer_is_truncated_normal_and_zeros_while_loading():
    from convnext_zoo.backbone import conv_initializer
    from convnext_zoo.internals import weights_to_be_loaded

    init = conv_initializer()
    drawn = keras.ops.convert_to_numpy(init((256, 256)))
    # std 0.02 truncated at 2 std: 0.88 x 0.02.
    assert 0.0170 < drawn.std() < 0.0182 and np.abs(drawn).max() <= 0.04 + 1e-6
    clone = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert type(clone) is type(init) and clone.get_config()["stddev"] == 0.02
    with weights_to_be_loaded():
        assert not np.any(keras.ops.convert_to_numpy(init((8, 8))))


def _uninitialized_registry():
    from keras.src.backend.common import global_state

    return list(global_state.get_global_attribute("uninitialized_variables", []) or [])


def test_backbone_variables_are_created_from_loaded_values():
    from convnext_zoo import weights
    from convnext_zoo.internals import (
        can_defer_variables, initialize_pending, is_pending, load_value, weights_to_be_loaded,
    )

    assert can_defer_variables()
    registry_before = _uninitialized_registry()
    with weights_to_be_loaded():
        model = create_convnext_v2("atto", num_classes=7, input_shape=(32, 32, 3))
    trunk = model.backbone.weights
    assert len(trunk) > 100 and all(is_pending(v) for v in model.weights)
    # Kept out of Keras' global list: a StatelessScope exit elsewhere must
    # not initialise them behind the loader.
    assert _uninitialized_registry() == registry_before
    with keras.StatelessScope():
        pass
    assert all(is_pending(v) for v in trunk)

    rng = np.random.default_rng(0)
    values = {v.path: rng.normal(size=v.shape).astype("float32") for v in trunk[:5]}
    for v in trunk[:5]:
        load_value(v, values[v.path])
    initialize_pending(model.weights)
    assert not any(is_pending(v) for v in model.weights)
    for v in trunk[:5]:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), values[v.path])
    # The rest got their own initializers: truncated normal for the convs,
    # and the head (not in the file: a replaced head) is random as usual.
    kernels = [v for v in trunk[5:] if v.path.endswith(("kernel", "depthwise_kernel"))]
    assert all(keras.ops.convert_to_numpy(v).std() > 0.01 for v in kernels)
    head = keras.ops.convert_to_numpy(model.get_layer("head_fc").kernel)
    assert 0.01 < head.std() < 0.03
    # load_value on a created variable assigns (and casts).
    load_value(trunk[0], values[trunk[0].path].astype("float64") * 2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(trunk[0]), values[trunk[0].path] * 2)
    # The model runs and trains after the deferred creation.
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(rng.normal(size=(4, 32, 32, 3)), np.arange(4), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert weights.keras_variables(model)  # names resolve for every variable


def test_a_callers_stateless_scope_keeps_its_own_deferral():
    from convnext_zoo.internals import is_pending, weights_to_be_loaded

    with keras.StatelessScope():
        with weights_to_be_loaded():
            model = create_convnext_v2("atto", include_top=False, input_shape=(32, 32, 3))
        assert all(is_pending(v) for v in model.weights)
    # The caller's scope initialised them on exit, as Keras does.
    assert not any(is_pending(v) for v in model.weights)


def test_without_deferral_the_backbone_is_built_with_zeros(monkeypatch):
    from convnext_zoo import internals

    monkeypatch.setattr(internals, "can_defer_variables", lambda: False)
    with internals.weights_to_be_loaded():
        model = create_convnext_v2("atto", num_classes=7, input_shape=(32, 32, 3))
    assert not any(internals.is_pending(v) for v in model.weights)
    trunk = [v for v in model.backbone.weights if v.path.endswith(("kernel", "depthwise_kernel"))]
    assert len(trunk) == 1 + 3 + 3 * 12 and not any(np.any(keras.ops.convert_to_numpy(v)) for v in trunk)
    # Outside the context again: random.
    again = create_convnext_v2("atto", num_classes=7, input_shape=(32, 32, 3))
    assert keras.ops.convert_to_numpy(again.backbone.weights[0]).std() > 0.01
