"""Unit tests of every PyTorch <-> Keras layout change and key renaming."""

import importlib
import numpy as np
import pytest

from convnext_zoo import layout


@pytest.fixture(scope="module")
def rand():
    return np.random.default_rng(0)


# === Tensor layouts: element-exact mapping and round trips ===


def test_conv_kernel_maps_every_element(rand):
    weight = rand.normal(size=(5, 3, 4, 2)).astype("float32")  # [O, I, kh, kw]
    kernel = layout.conv_to_keras(weight)
    assert kernel.shape == (4, 2, 3, 5)
    for o, i, y, x in [(0, 0, 0, 0), (4, 2, 3, 1), (2, 1, 1, 0)]:
        assert kernel[y, x, i, o] == weight[o, i, y, x]
    np.testing.assert_array_equal(layout.conv_to_torch(kernel), weight)


def test_conv_kernel_gives_the_same_convolution(rand):
    """One output pixel of a 'valid' conv, computed in both layouts."""
    weight = rand.normal(size=(6, 3, 4, 4))
    patch_chw = rand.normal(size=(3, 4, 4))
    torch_out = np.einsum("oiyx,iyx->o", weight, patch_chw)
    keras_out = np.einsum("yxio,yxi->o", layout.conv_to_keras(weight), patch_chw.transpose(1, 2, 0))
    np.testing.assert_allclose(keras_out, torch_out, rtol=1e-12)


def test_depthwise_kernel(rand):
    weight = rand.normal(size=(8, 1, 7, 7)).astype("float32")
    kernel = layout.depthwise_to_keras(weight)
    assert kernel.shape == (7, 7, 8, 1)
    assert kernel[2, 5, 6, 0] == weight[6, 0, 2, 5]
    np.testing.assert_array_equal(layout.depthwise_to_torch(kernel), weight)
    with pytest.raises(ValueError, match=r"one input channel.*\(8, 2, 7, 7\)"):
        layout.depthwise_to_keras(np.zeros((8, 2, 7, 7)))


def test_dense_kernel_from_linear_and_1x1_conv(rand):
    weight = rand.normal(size=(12, 4)).astype("float32")  # Linear [out, in]
    kernel = layout.dense_to_keras(weight)
    assert kernel.shape == (4, 12) and kernel[3, 7] == weight[7, 3]
    x = rand.normal(size=(4,))
    np.testing.assert_allclose(x @ kernel, weight @ x, rtol=1e-6)
    # timm's small variants store the MLP as 1x1 convs.
    np.testing.assert_array_equal(layout.dense_to_keras(weight[:, :, None, None]), kernel)
    np.testing.assert_array_equal(layout.dense_to_torch(kernel), weight)
    assert layout.dense_to_torch(kernel, conv_1x1=True).shape == (12, 4, 1, 1)
    with pytest.raises(ValueError, match=r"Only a 1x1 conv.*\(12, 4, 3, 3\)"):
        layout.dense_to_keras(np.zeros((12, 4, 3, 3)))
    with pytest.raises(ValueError, match="2-D Linear weight"):
        layout.dense_to_keras(np.zeros((12,)))


def test_vector_squeezes_official_grn_shape(rand):
    grn = rand.normal(size=(1, 1, 1, 16))
    np.testing.assert_array_equal(layout.vector_to_keras(grn), grn.reshape(16))
    np.testing.assert_array_equal(layout.vector_to_keras(grn[0, 0, 0]), grn.reshape(16))
    np.testing.assert_array_equal(layout.vector_to_torch(grn.reshape(16), (1, 1, 1, 16)), grn)
    with pytest.raises(ValueError, match=r"Expected a vector.*\(2, 16\)"):
        layout.vector_to_keras(np.zeros((2, 16)))


@pytest.mark.parametrize(
    "kind, shape, expected",
    [
        ("conv", (96, 3, 4, 4), (4, 4, 3, 96)),
        ("depthwise", (96, 1, 7, 7), (7, 7, 96, 1)),
        ("dense", (384, 96), (96, 384)),
        ("dense", (384, 96, 1, 1), (96, 384)),
        ("dense", (384, 96, 3, 3), None),
        ("vector", (1, 1, 1, 384), (384,)),
        ("vector", (2, 384), None),
        ("conv", (96, 3), None),
        ("sparse_conv", (4, 40, 80), (2, 2, 40, 80)),
        ("sparse_conv", (5, 40, 80), None),
        ("sparse_depthwise", (49, 40), (7, 7, 40, 1)),
        ("token", (1, 512, 1, 1), (512,)),
        ("token", (512, 1, 1, 1), None),
    ],
)
def test_keras_shape_agrees_with_to_keras(kind, shape, expected):
    assert layout.keras_shape(kind, shape) == expected
    if expected is not None:
        assert layout.to_keras(kind, np.zeros(shape)).shape == expected


def _minkowski_offsets(k):
    """MinkowskiEngine's kernel offsets of a 2-D window in storage order: the first axis slowest.

    Its coordinates are (x, y) = (column, row) here, as the official
    `remap_checkpoint_keys` transposes the window when it builds dense weights.
    """
    return [(column, row) for column in range(k) for row in range(k)]


def test_sparse_conv_kernel_follows_minkowski_offsets(rand):
    kernel = rand.normal(size=(9, 4, 6))  # [k*k, in, out]
    keras_kernel = layout.sparse_conv_to_keras(kernel)
    assert keras_kernel.shape == (3, 3, 4, 6)
    for offset, (column, row) in enumerate(_minkowski_offsets(3)):
        np.testing.assert_array_equal(keras_kernel[row, column], kernel[offset])
    with pytest.raises(ValueError, match="square window"):
        layout.sparse_conv_to_keras(np.zeros((5, 4, 6)))


def test_sparse_depthwise_kernel_follows_minkowski_offsets(rand):
    kernel = rand.normal(size=(49, 5))  # [k*k, C]
    keras_kernel = layout.sparse_depthwise_to_keras(kernel)
    assert keras_kernel.shape == (7, 7, 5, 1)
    for offset, (column, row) in enumerate(_minkowski_offsets(7)):
        np.testing.assert_array_equal(keras_kernel[row, column, :, 0], kernel[offset])


def test_sparse_kernels_agree_with_the_official_dense_remap(rand):
    """The official fine-tuning remap (permute, reshape, swap the window axes), then timm -> Keras."""
    kernel = rand.normal(size=(4, 3, 5))
    dense = kernel.transpose(2, 1, 0).reshape(5, 3, 2, 2).swapaxes(3, 2)  # [out, in, kh, kw]
    np.testing.assert_array_equal(layout.sparse_conv_to_keras(kernel), layout.conv_to_keras(dense))
    depthwise = rand.normal(size=(49, 6))
    dense = depthwise.transpose(1, 0).reshape(6, 1, 7, 7).swapaxes(3, 2)
    np.testing.assert_array_equal(layout.sparse_depthwise_to_keras(depthwise),
                                  layout.depthwise_to_keras(dense))


# === Names ===


@pytest.mark.parametrize(
    "key, expected",
    [
        ("encoder.downsample_layers.0.0.weight", ("stem_0/kernel", "conv")),
        ("encoder.downsample_layers.0.1.bias", ("stem_1/beta", "vector")),
        ("encoder.downsample_layers.3.0.ln.weight", ("stages_3_downsample_0/gamma", "vector")),
        ("encoder.downsample_layers.3.1.kernel", ("stages_3_downsample_1/kernel", "sparse_conv")),
        ("encoder.downsample_layers.3.1.bias", ("stages_3_downsample_1/bias", "vector")),
        ("encoder.stages.2.5.dwconv.kernel", ("stages_2_blocks_5_conv_dw/kernel", "sparse_depthwise")),
        ("encoder.stages.2.5.norm.ln.bias", ("stages_2_blocks_5_norm/beta", "vector")),
        ("encoder.stages.2.5.pwconv2.linear.weight", ("stages_2_blocks_5_mlp_fc2/kernel", "dense")),
        ("encoder.stages.2.5.grn.beta", ("stages_2_blocks_5_mlp_grn/beta", "vector")),
        ("proj.weight", ("proj/kernel", "dense")),
        ("mask_token", ("mask_token/mask_token", "token")),
        ("decoder.0.dwconv.weight", ("decoder_0_conv_dw/kernel", "depthwise")),
        ("decoder.0.norm.bias", ("decoder_0_norm/beta", "vector")),
        ("decoder.0.pwconv1.weight", ("decoder_0_mlp_fc1/kernel", "dense")),
        ("decoder.0.grn.gamma", ("decoder_0_mlp_grn/gamma", "vector")),
        ("pred.bias", ("pred/bias", "vector")),
        ("decoder.0.gamma", None),
        ("head.weight", None),
    ],
)
def test_fcmae_to_keras_name(key, expected):
    assert layout.fcmae_to_keras_name(key) == expected


@pytest.mark.parametrize(
    "key, expected",
    [
        ("stem.0.weight", ("stem_0/kernel", "conv")),
        ("stem.1.bias", ("stem_1/beta", "vector")),
        ("stages.2.downsample.0.weight", ("stages_2_downsample_0/gamma", "vector")),
        ("stages.2.downsample.1.weight", ("stages_2_downsample_1/kernel", "conv")),
        ("stages.0.blocks.1.conv_dw.weight", ("stages_0_blocks_1_conv_dw/kernel", "depthwise")),
        ("stages.3.blocks.2.norm.weight", ("stages_3_blocks_2_norm/gamma", "vector")),
        ("stages.2.blocks.5.mlp.fc1.weight", ("stages_2_blocks_5_mlp_fc1/kernel", "dense")),
        ("stages.2.blocks.5.mlp.fc2.bias", ("stages_2_blocks_5_mlp_fc2/bias", "vector")),
        ("stages.1.blocks.0.mlp.grn.weight", ("stages_1_blocks_0_mlp_grn/gamma", "vector")),
        ("stages.1.blocks.0.mlp.grn.bias", ("stages_1_blocks_0_mlp_grn/beta", "vector")),
        ("stages.1.blocks.0.gamma", ("stages_1_blocks_0_gamma/gamma", "vector")),
        ("head.norm.weight", ("head_norm/gamma", "vector")),
        ("head.fc.weight", ("head_fc/kernel", "dense")),
        ("head.fc.bias", ("head_fc/bias", "vector")),
        ("stages.1.blocks.0.norm.running_mean", None),
        ("something.else", None),
    ],
)
def test_timm_to_keras_name(key, expected):
    assert layout.timm_to_keras_name(key) == expected
    if expected:
        assert layout.keras_to_timm_name(expected[0]) == key


@pytest.mark.parametrize(
    "official, timm_key",
    [
        ("downsample_layers.0.0.weight", "stem.0.weight"),
        ("downsample_layers.0.1.bias", "stem.1.bias"),
        ("downsample_layers.3.0.weight", "stages.3.downsample.0.weight"),
        ("downsample_layers.3.1.bias", "stages.3.downsample.1.bias"),
        ("stages.2.11.dwconv.weight", "stages.2.blocks.11.conv_dw.weight"),
        ("stages.2.11.norm.bias", "stages.2.blocks.11.norm.bias"),
        ("stages.0.1.pwconv1.weight", "stages.0.blocks.1.mlp.fc1.weight"),
        ("stages.0.1.pwconv2.bias", "stages.0.blocks.1.mlp.fc2.bias"),
        ("stages.0.1.grn.gamma", "stages.0.blocks.1.mlp.grn.weight"),
        ("stages.0.1.grn.beta", "stages.0.blocks.1.mlp.grn.bias"),
        ("stages.3.2.gamma", "stages.3.blocks.2.gamma"),
        ("norm.weight", "head.norm.weight"),
        ("head.weight", "head.fc.weight"),
        ("head.bias", "head.fc.bias"),
    ],
)
def test_official_renaming_table(official, timm_key):
    assert layout.official_to_timm_name(official) == timm_key
    assert layout.timm_to_official_name(timm_key) == official
    assert layout.source_to_keras_name(official, "official") == layout.timm_to_keras_name(timm_key)


@pytest.mark.parametrize(
    "hf_key, timm_key",
    [
        ("convnext.embeddings.patch_embeddings.weight", "stem.0.weight"),
        ("convnextv2.embeddings.layernorm.bias", "stem.1.bias"),
        ("convnext.encoder.stages.1.downsampling_layer.0.weight", "stages.1.downsample.0.weight"),
        ("convnext.encoder.stages.1.downsampling_layer.1.bias", "stages.1.downsample.1.bias"),
        ("convnext.encoder.stages.0.layers.2.dwconv.weight", "stages.0.blocks.2.conv_dw.weight"),
        ("convnext.encoder.stages.0.layers.2.layernorm.weight", "stages.0.blocks.2.norm.weight"),
        ("convnextv2.encoder.stages.0.layers.2.pwconv1.weight", "stages.0.blocks.2.mlp.fc1.weight"),
        ("convnextv2.encoder.stages.0.layers.2.grn.bias", "stages.0.blocks.2.mlp.grn.bias"),
        ("convnext.encoder.stages.3.layers.0.layer_scale_parameter", "stages.3.blocks.0.gamma"),
        ("convnext.layernorm.weight", "head.norm.weight"),
        ("classifier.bias", "head.fc.bias"),
        ("embeddings.patch_embeddings.bias", "stem.0.bias"),  # bare ConvNextModel
    ],
)
def test_transformers_renaming_table(hf_key, timm_key):
    assert layout.transformers_to_timm_name(hf_key) == timm_key
    family = "v2" if hf_key.startswith("convnextv2") else "v1"
    if hf_key.startswith(("convnext", "classifier")):
        assert layout.timm_to_transformers_name(timm_key, family) == hf_key


# === Against the real models: every key, every shape ===


def _keras_shapes(family, variant):
    from convnext_zoo import create_convnext_v1, create_convnext_v2
    from convnext_zoo.weights import keras_variables

    factory = create_convnext_v1 if family == "v1" else create_convnext_v2
    model = factory(variant, input_shape=(None, None, 3))
    return {name: tuple(v.shape) for name, v in keras_variables(model).items()}


@pytest.mark.parametrize("family, variant", [("v2", "atto"), ("v1", "tiny")])
def test_every_timm_key_maps_onto_every_keras_variable(family, variant):
    timm = importlib.import_module("timm")
    model = timm.create_model(f"convnext{'v2' if family == 'v2' else ''}_{variant}")
    keras_shapes = _keras_shapes(family, variant)
    mapped = {}
    for key, value in model.state_dict().items():
        name, kind = layout.timm_to_keras_name(key)
        assert name not in mapped, key
        mapped[name] = layout.keras_shape(kind, tuple(value.shape))
        # The lazy shape rule and the real transform agree.
        assert layout.to_keras(kind, value.numpy()).shape == mapped[name]
    assert mapped == keras_shapes


@pytest.mark.parametrize("arch", ["convnextv2_atto", "convnext_tiny"])
def test_official_table_agrees_with_timm_checkpoint_filter_fn(arch):
    """timm's own official->timm mapping is an independent reference."""
    timm = importlib.import_module("timm")
    import torch
    from timm.models.convnext import checkpoint_filter_fn

    model = timm.create_model(arch)
    official = {}
    for key, value in model.state_dict().items():
        new = layout.timm_to_official_name(key)
        if ".grn." in new:
            value = value.reshape(1, 1, 1, -1)
        elif ".pwconv" in new and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        official[new] = value
    assert "downsample_layers.0.0.weight" in official and "norm.weight" in official
    remapped = checkpoint_filter_fn({"model": official}, model)
    assert set(remapped) == set(model.state_dict())
    model.load_state_dict(remapped, strict=True)
    for key in official:
        assert layout.official_to_timm_name(key) in remapped
    assert torch.equal(remapped["head.fc.weight"], model.state_dict()["head.fc.weight"])


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_transformers_table_covers_the_transformers_model(family):
    transformers = importlib.import_module("transformers")
    if family == "v1":
        config = transformers.ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], num_labels=5)
        model = transformers.ConvNextForImageClassification(config)
    else:
        config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], num_labels=5)
        model = transformers.ConvNextV2ForImageClassification(config)
    timm_keys = set()
    for key, value in model.state_dict().items():
        timm_key = layout.transformers_to_timm_name(key)
        assert timm_key is not None, key
        name, kind = layout.timm_to_keras_name(timm_key)
        assert layout.keras_shape(kind, tuple(value.shape)) is not None, key
        assert layout.timm_to_transformers_name(timm_key, family) == key
        timm_keys.add(timm_key)
    assert len(timm_keys) == len(model.state_dict())
