"""Recipes, layer-wise LR decay, weight-decay exclusions and the optimizer on three backends."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras

import convnext_zoo
from convnext_zoo import layout, recipes, training


# --- The official functions, transcribed from the sources named in
# convnext_zoo/recipes.py (ConvNeXt and ConvNeXt-V2 optim_factory.py), applied
# to official parameter names: an independent path to the same ids.

def official_group_id(var_name):
    if var_name.startswith("downsample_layers"):
        stage = int(var_name.split(".")[1])
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage]
    if var_name.startswith("stages"):
        stage, block = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        if stage in (0, 1):
            return stage + 1
        if stage == 2:
            return 3 + block // 3
        return 12
    return 13


def official_single_id(var_name, depths):
    if var_name.startswith("downsample_layers"):
        return sum(depths[: int(var_name.split(".")[1])]) + 1
    if var_name.startswith("stages"):
        stage, block = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return sum(depths[:stage]) + block + 1
    return sum(depths) + 1


def official_no_decay(var_name, shape, family):
    # get_parameter_groups: 1-D or bias (V1); V2 also ".gamma" / ".beta" (GRN).
    excluded = len(shape) == 1 or var_name.endswith(".bias")
    if family == "v2":
        excluded = excluded or var_name.endswith(".gamma") or var_name.endswith(".beta")
    return excluded


def official_names(model):
    """`{keras variable name: (official name, official shape)}`."""
    out = {}
    for variable in model.trainable_variables:
        name = "/".join(variable.path.split("/")[-2:])
        official = layout.timm_to_official_name(layout.keras_to_timm_name(name))
        assert official, name
        shape = tuple(variable.shape)
        if ".grn." in official:
            shape = (1, 1, 1, shape[-1])  # official GRN parameters are 4-D
        elif "dwconv.weight" in official:
            shape = (shape[2], 1, shape[0], shape[1])
        out[name] = (official, shape)
    return out


@pytest.fixture(scope="module")
def v1_tiny():
    return convnext_zoo.create_convnext_v1("tiny", num_classes=10, input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def v2_atto():
    return convnext_zoo.create_convnext_v2("atto", num_classes=10, input_shape=(32, 32, 3))


def test_group_layer_ids_match_official_v1_tiny(v1_tiny):
    depths = v1_tiny.backbone.depths
    for name, (official, _) in official_names(v1_tiny).items():
        layer = name.split("/")[0]
        assert training.layer_id(layer, depths, "group") == official_group_id(official), name
    # Hand-checked: stem 0, stage 1 downsample 2, stage 2 block 8 -> 3 + 8 // 3 = 5,
    # last downsample and stage 3 -> 12, head 13.
    assert training.layer_id("stem_1", depths, "group") == 0
    assert training.layer_id("stages_1_downsample_0", depths, "group") == 2
    assert training.layer_id("stages_2_blocks_8_mlp_fc2", depths, "group") == 5
    assert training.layer_id("stages_3_downsample_1", depths, "group") == 12
    assert training.layer_id("head_fc", depths, "group") == 13


def test_single_layer_ids_match_official_v2_atto(v2_atto):
    depths = v2_atto.backbone.depths
    assert depths == [2, 2, 6, 2]
    for name, (official, _) in official_names(v2_atto).items():
        layer = name.split("/")[0]
        assert training.layer_id(layer, depths, "single") == official_single_id(official, depths), name
    # Hand-checked: the stem is 1 (not 0), downsampling i shares the id of
    # stage i's first block, head sum(depths) + 1 = 13.
    assert training.layer_id("stem_0", depths, "single") == 1
    assert training.layer_id("stages_1_downsample_1", depths, "single") == 3
    assert training.layer_id("stages_1_blocks_0_mlp_grn", depths, "single") == 3
    assert training.layer_id("stages_2_blocks_5_conv_dw", depths, "single") == 10
    assert training.layer_id("stages_3_blocks_1_norm", depths, "single") == 12
    assert training.layer_id("head_norm", depths, "single") == 13


def test_multipliers(v2_atto, v1_tiny):
    m = training.layer_decay_multipliers(v2_atto, 0.9, "single")
    # values[k] = decay ** (num_layers + 1 - k), num_layers = sum(depths) = 12
    assert m["head_fc"] == 1.0 and m["head_norm"] == 1.0
    assert m["stem_0"] == pytest.approx(0.9 ** 12)
    assert m["stages_2_blocks_5_mlp_fc1"] == pytest.approx(0.9 ** 3)
    assert m["stages_3_blocks_1_mlp_fc2"] == pytest.approx(0.9)
    m1 = training.layer_decay_multipliers(v1_tiny, 0.8, "group")
    assert m1["stem_0"] == pytest.approx(0.8 ** 13)
    assert m1["stages_2_blocks_4_conv_dw"] == pytest.approx(0.8 ** 9)
    assert m1["stages_3_blocks_2_gamma"] == pytest.approx(0.8)
    assert set(training.layer_decay_multipliers(v1_tiny, 1.0, "group").values()) == {1.0}


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_weight_decay_exclusions_match_official(family, v1_tiny, v2_atto):
    model = v1_tiny if family == "v1" else v2_atto
    optimizer = training.LayerDecayAdamW(learning_rate=1e-3, weight_decay=0.05)
    optimizer.build(model.trainable_variables)
    names = official_names(model)
    decayed = 0
    for variable in model.trainable_variables:
        official, shape = names["/".join(variable.path.split("/")[-2:])]
        expected = not official_no_decay(official, shape, family)
        assert optimizer._use_weight_decay(variable) == expected, official
        decayed += expected
    assert decayed == sum(1 for v in model.trainable_variables if v.name == "kernel")


def test_update_uses_layer_multiplier_and_scaled_decay():
    kernel_a = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    kernel_b = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    bias = keras.Variable(np.ones((2,), "float32"), name="bias")
    # Paths "a/kernel", "b/kernel", "b/bias" as Keras layers name them.
    for v, path in ((kernel_a, "a/kernel"), (kernel_b, "b/kernel"), (bias, "b/bias")):
        v._path = path
    optimizer = training.LayerDecayAdamW(
        lr_multipliers={"a": 0.5}, learning_rate=0.1, weight_decay=0.2)
    grads = [np.zeros((2, 2), "float32"), np.zeros((2, 2), "float32"), np.zeros((2,), "float32")]
    optimizer.apply(grads, [kernel_a, kernel_b, bias])
    # Zero gradient: Adam moves nothing; decoupled decay scales by 1 - lr*mult*wd.
    np.testing.assert_allclose(kernel_a.numpy(), 1 - 0.1 * 0.5 * 0.2, rtol=1e-6)
    np.testing.assert_allclose(kernel_b.numpy(), 1 - 0.1 * 0.2, rtol=1e-6)
    np.testing.assert_allclose(bias.numpy(), 1.0)
    # A unit gradient: the first Adam step is lr * mult (sign of the gradient).
    optimizer2 = training.LayerDecayAdamW(lr_multipliers={"a": 0.25}, learning_rate=0.1,
                                          weight_decay=0.0)
    kernel_a.assign(np.ones((2, 2)))
    kernel_b.assign(np.ones((2, 2)))
    optimizer2.apply([np.ones((2, 2), "float32")] * 2 + [np.ones((2,), "float32")],
                     [kernel_a, kernel_b, bias])
    np.testing.assert_allclose(kernel_a.numpy(), 1 - 0.1 * 0.25, rtol=1e-4)
    np.testing.assert_allclose(kernel_b.numpy(), 1 - 0.1, rtol=1e-4)


def test_recipe_scaling():
    plan = recipes.scale_recipe("v2_fcmae_ft_in1k", "atto", epochs=10, batch_size=64,
                                steps_per_epoch=20)
    assert plan["lr"] == pytest.approx(2e-4 * 64 / 256)
    assert plan["layer_decay"] == 0.9 and plan["layer_decay_type"] == "single"
    assert plan["warmup_steps"] == 0 and plan["total_steps"] == 200
    assert plan["smoothing"] == 0.2 and plan["weight_decay"] == 0.3
    tiny = recipes.scale_recipe("v2_fcmae_ft_in1k", "tiny", epochs=30, batch_size=32,
                                steps_per_epoch=10)
    assert tiny["warmup_steps"] == round(40 / 300 * 300)
    assert recipes.scale_recipe("v2_fcmae_ft_in1k", "femto", epochs=1, batch_size=32,
                                steps_per_epoch=1)["values_from"] == "atto"
    v1 = recipes.scale_recipe("v1_in22k_ft_in1k", "base", epochs=3, batch_size=512,
                              steps_per_epoch=4, lr=1e-3)
    assert v1["lr"] == 1e-3 and v1["layer_decay"] == 0.8 and v1["drop_path"] == 0.2
    assert recipes.scale_recipe("v1_in22k_ft_in1k", "base", epochs=3, batch_size=512,
                                steps_per_epoch=4)["lr"] == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="Did you mean 'v1_in1k'"):
        recipes.get_recipe("v1_in1kk")
    json.dumps(plan)


def test_schedule_warmup_then_cosine():
    plan = {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 10, "total_steps": 110}
    schedule = training.learning_rate_schedule(plan)
    values = [float(schedule(step)) for step in (0, 5, 10, 60, 110)]
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert values[1] == pytest.approx(5e-4, rel=1e-4)
    assert values[2] == pytest.approx(1e-3, rel=1e-4)
    assert values[3] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-3)
    assert values[4] == pytest.approx(1e-5, rel=1e-3)


def _tiny_classifier():
    backbone = convnext_zoo.ConvNeXtBackbone(
        (1, 1, 2, 1), (8, 16, 24, 32), use_grn=True, layer_scale_init_value=None,
        image_shape=(32, 32, 3))
    return convnext_zoo.ConvNeXtImageClassifier(backbone, num_classes=3)


def test_keras_round_trip_with_optimizer_state(tmp_path):
    keras.utils.set_random_seed(0)
    model = _tiny_classifier()
    plan = recipes.scale_recipe("v2_fcmae_ft_in1k", "atto", epochs=2, batch_size=8,
                                steps_per_epoch=2, lr=1e-3)
    model.compile(optimizer=training.make_optimizer(model, plan),
                  loss=training.make_loss(plan), metrics=["categorical_accuracy"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, training.LayerDecayAdamW)
    assert loaded.optimizer.lr_multipliers == model.optimizer.lr_multipliers
    assert loaded.optimizer.lr_multipliers["stem_0"] == pytest.approx(0.9 ** 5)  # depths sum 5, stem id 1
    assert loaded.optimizer.use_ema
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Resuming: one more epoch from either gives the same weights.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _variables_made_while_tracing(model, x, y):
    """The variables that `model.fit` creates inside TensorFlow's traced steps (each one costs a retrace)."""
    import tensorflow as tf

    made = []

    def creator(next_creator, **kwargs):
        if tf.inside_function():
            made.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return made


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow's tracing")
def test_the_optimizer_is_built_before_fit_traces_its_step():
    """Keras would build the optimizer inside the first traced step, which TensorFlow then traces again."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, 16)
    model = _tiny_classifier()
    assert not model.optimizer.built  # keras-hub's compile at construction: nothing allocated
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))  # keras-hub's loss and metric
    assert _variables_made_while_tracing(model, x, y) == []
    assert len(model.optimizer.variables) > 2 * len(model.trainable_variables)
    # As the training commands compile: a metric object.
    model = _tiny_classifier()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy()])
    assert _variables_made_while_tracing(model, x, y) == []
    # FCMAE pre-training (no labels).
    fcmae = convnext_zoo.FCMAE(_tiny_classifier().backbone, mask_ratio=0.5)
    fcmae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    assert _variables_made_while_tracing(fcmae, x, None) == []
    # What the check catches: a metric named by a string is made inside the step.
    model = _tiny_classifier()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), metrics=["sparse_categorical_accuracy"])
    assert "total" in _variables_made_while_tracing(model, x, y)


_STEPS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    import convnext_zoo
    from convnext_zoo import recipes, training
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(0)
    data = load_digits()
    x = data.images[:256].repeat(4, axis=1).repeat(4, axis=2)  # 32 x 32
    x = np.repeat((x[..., None] - 4.9) / 6.0, 3, axis=-1).astype("float32")
    y = keras.utils.to_categorical(data.target[:256], 10)
    backbone = convnext_zoo.ConvNeXtBackbone(
        (1, 1, 1, 1), (16, 24, 32, 48), use_grn=True, layer_scale_init_value=None,
        image_shape=(32, 32, 3))
    model = convnext_zoo.ConvNeXtImageClassifier(backbone, num_classes=10)
    plan = recipes.scale_recipe("v2_fcmae_ft_in1k", "atto", epochs=6, batch_size=32,
                                steps_per_epoch=8, lr=4e-3)  # 4 epochs below
    model.compile(optimizer=training.make_optimizer(model, plan),
                  loss=training.make_loss(plan), metrics=["categorical_accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    print(json.dumps({"backend": keras.config.backend(), "loss": history.history["loss"],
                      "ema": model.optimizer.use_ema}))
""")


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_loss_falls_on_backend(backend):
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run([sys.executable, "-c", _STEPS_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend
    losses = report["loss"]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
