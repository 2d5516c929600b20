"""FCMAE: the dense masked encoder against an independent sparse reference, the loss, checkpoints.

The reference (`sparse_encoder`) is written from the definitions in the other
form: each sample's visible positions are gathered into a list of points,
every convolution sums over the visible neighbours of each visible output
point, GRN takes each sample's points, and the result is scattered back onto
the grid. It runs in float64 NumPy and knows nothing of the Keras code.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from scipy.special import erf

import convnext_zoo
from convnext_zoo import ConvNeXtBackbone
from convnext_zoo.fcmae import FCMAE
from convnext_zoo.weights import keras_variables

# === The independent reference ===


class Points:
    """One sample's visible positions on one grid: coordinates, features, and a lookup."""

    def __init__(self, active, features):
        self.active = active  # (h, w) bool
        self.coords = np.argwhere(active)
        self.features = features  # (n, C), in `coords` order
        self.index = np.full(active.shape, -1)
        self.index[tuple(self.coords.T)] = np.arange(len(self.coords))


def _padding(size, kernel, stride):
    # Keras "valid" where the stride equals the kernel, else "same" (TF's split: less before).
    if stride == kernel:
        return 0
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0) // 2


def sparse_conv(points, kernel, bias, stride, out_active, depthwise=False):
    """Each visible output point sums its kernel window over the visible input points only."""
    kh, kw = kernel.shape[:2]
    top = _padding(points.active.shape[0], kh, stride)
    left = _padding(points.active.shape[1], kw, stride)
    coords = np.argwhere(out_active)
    out = np.tile(bias, (len(coords), 1))
    for a in range(kh):
        for b in range(kw):
            rows = coords[:, 0] * stride - top + a
            cols = coords[:, 1] * stride - left + b
            inside = (rows >= 0) & (rows < points.active.shape[0]) & (cols >= 0) & (cols < points.active.shape[1])
            source = np.full(len(coords), -1)
            source[inside] = points.index[rows[inside], cols[inside]]
            hit = source >= 0
            if depthwise:
                out[hit] += points.features[source[hit]] * kernel[a, b, :, 0]
            else:
                out[hit] += points.features[source[hit]] @ kernel[a, b]
    return Points(out_active, out)


def layer_norm(f, gamma, beta):
    mean = f.mean(-1, keepdims=True)
    return (f - mean) / np.sqrt(((f - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * gamma + beta


def sparse_encoder(w, image, removed, strides, depths):
    """The masked encoder of one sample: `(gh', gw', C)` features, zeros at removed positions.

    Args:
        w: `{keras variable name: float64 array}`.
        image: `(H, W, C)`.
        removed: `(gh, gw)` patch mask, 1 removed.
        strides: the backbone's four strides.
    """
    def active_at(level):  # level 0: pixels, 1-4: stages
        factor = int(np.prod(strides[level:]))
        return np.kron(1 - removed, np.ones((factor, factor))).astype(bool)

    pixels = active_at(0)
    points = Points(pixels, image[pixels])
    points = sparse_conv(points, w["stem_0/kernel"], w["stem_0/bias"], strides[0], active_at(1))
    points.features = layer_norm(points.features, w["stem_1/gamma"], w["stem_1/beta"])
    for stage, depth in enumerate(depths):
        if stage:
            p = f"stages_{stage}_downsample"
            points.features = layer_norm(points.features, w[f"{p}_0/gamma"], w[f"{p}_0/beta"])
            points = sparse_conv(points, w[f"{p}_1/kernel"], w[f"{p}_1/bias"], strides[stage],
                                 active_at(stage + 1))
        for block in range(depth):
            p = f"stages_{stage}_blocks_{block}"
            y = sparse_conv(points, w[f"{p}_conv_dw/kernel"], w[f"{p}_conv_dw/bias"], 1,
                            points.active, depthwise=True).features
            y = layer_norm(y, w[f"{p}_norm/gamma"], w[f"{p}_norm/beta"])
            y = y @ w[f"{p}_mlp_fc1/kernel"] + w[f"{p}_mlp_fc1/bias"]
            y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
            gx = np.sqrt((y**2).sum(0))  # over this sample's points
            nx = gx / (gx.mean() + 1e-6)
            y = w[f"{p}_mlp_grn/gamma"] * (y * nx) + w[f"{p}_mlp_grn/beta"] + y
            y = y @ w[f"{p}_mlp_fc2/kernel"] + w[f"{p}_mlp_fc2/bias"]
            points = Points(points.active, points.features + y)
    dense = np.zeros(points.active.shape + (points.features.shape[1],))
    dense[tuple(points.coords.T)] = points.features
    return dense


# === Helpers ===

TINY = dict(depths=(1, 1, 2, 1), hidden_dims=(8, 16, 24, 32), use_grn=True,
            layer_scale_init_value=None)


def tiny_fcmae(size=32, **kwargs):
    encoder = ConvNeXtBackbone(**TINY, image_shape=(size, size, 3))
    return FCMAE(encoder, decoder_dim=16, seed=1, **kwargs)


def randomize(model, rng):
    """Random, non-trivial weights everywhere (norms, GRN and the mask token included)."""
    model.set_weights([
        (rng.normal(size=w.shape) * (0.5 if w.ndim == 1 else 1 / np.sqrt(np.prod(w.shape[:-1])))
         + (1.0 if w.ndim == 1 else 0.0)).astype("float32")
        for w in model.get_weights()
    ])


def numpy_weights(model):
    return {name: keras.ops.convert_to_numpy(v).astype("float64")
            for name, v in keras_variables(model).items()}


def fixed_masks(model, rng, batch):
    removed = np.ones((batch, model.num_patches), "float32")
    for row in removed:
        row[rng.permutation(model.num_patches)[:model.num_kept]] = 0
    return removed.reshape((batch, *model.grid_shape))


def _np(x):
    return keras.ops.convert_to_numpy(x)


# === The masked encoder ===


@pytest.mark.parametrize("size, strides", [(32, (4, 2, 1, 1)), (128, (4, 2, 2, 2))])
def test_masked_encoder_matches_the_sparse_reference(size, strides, rng):
    model = tiny_fcmae(size)
    assert model.encoder.strides == strides and model.grid_shape == (4, 4)
    randomize(model, rng)
    images = rng.normal(size=(3, size, size, 3)).astype("float32")
    removed = fixed_masks(model, rng, 3)
    out = _np(model.encode(images, removed))
    w = numpy_weights(model.encoder)
    for i in range(3):
        expected = sparse_encoder(w, images[i].astype("float64"), removed[i], strides, TINY["depths"])
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(out[i], expected, rtol=0, atol=1e-5 * scale)
        visible = removed[i] == 0
        assert np.abs(expected[visible]).min() > 0 and not out[i][~visible].any()


def test_grn_takes_each_samples_own_statistics(rng):
    # The same sample next to different batch-mates gives the same features
    # (a batch-pooled GRN, as MinkowskiGRN, would not).
    model = tiny_fcmae()
    randomize(model, rng)
    images = rng.normal(size=(3, 32, 32, 3)).astype("float32")
    removed = fixed_masks(model, rng, 3)
    together = _np(model.encode(images, removed))
    alone = _np(model.encode(images[:1], removed[:1]))
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-5)


def test_masked_grn_counts_visible_positions_only(rng):
    from convnext_zoo.layers import GlobalResponseNorm

    x = rng.normal(size=(2, 4, 4, 6)).astype("float32")
    visible = (rng.uniform(size=(2, 4, 4, 1)) > 0.5).astype("float32")
    layer = GlobalResponseNorm()
    layer.build(x.shape)
    layer.set_weights([rng.normal(size=6).astype("float32"), rng.normal(size=6).astype("float32")])
    out = _np(layer(x, visible=visible))
    changed = x + 100.0 * (1 - visible)  # removed positions only
    np.testing.assert_allclose(_np(layer(changed, visible=visible)) * visible, out * visible,
                               rtol=1e-6, atol=1e-6)
    # Without the mask, the removed positions do change the statistics.
    assert np.abs((_np(layer(changed)) - _np(layer(x))) * visible).max() > 1e-3


def test_masked_grn_gradient_is_finite_when_a_channel_is_zero_where_visible(rng):
    # float32 GELU is exactly 0 below about -5.5: with 6 visible positions a
    # channel can vanish, and the norm's gradient must then be 0, not 0 / 0.
    import tensorflow as tf

    from convnext_zoo.layers import GlobalResponseNorm

    if keras.config.backend() != "tensorflow":
        pytest.skip("uses tf.GradientTape")
    x = rng.normal(size=(2, 4, 4, 6)).astype("float32")
    visible = np.zeros((2, 4, 4, 1), "float32")
    visible[:, :2, :3] = 1
    x[0, :2, :3, 2] = 0.0  # channel 2 of sample 0: zero at its visible positions only
    layer = GlobalResponseNorm()
    layer.build(x.shape)
    layer.set_weights([rng.normal(size=6).astype("float32"), rng.normal(size=6).astype("float32")])
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = tf.reduce_sum(layer(inputs, visible=visible, training=True) ** 2)
    grads = tape.gradient(loss, [inputs, *layer.trainable_variables])
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    assert np.abs(grads[0].numpy()).max() > 0
    # The plain (dense) GRN too: a channel zero everywhere (TensorFlow's EuclideanNorm kernel).
    dense = x.copy()
    dense[1, ..., 4] = 0.0
    inputs = tf.constant(dense)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = tf.reduce_sum(tf.function(layer)(inputs, training=True) ** 2)
    assert all(np.isfinite(g.numpy()).all() for g in tape.gradient(loss, [inputs, *layer.trainable_variables]))
    # Inference keeps the plain kernel: no custom-gradient IdentityN in its graph (OpenVINO converts it).
    graph = tf.function(layer).get_concrete_function(tf.TensorSpec(dense.shape, tf.float32)).graph
    kinds = {op.type for op in graph.get_operations()}
    assert "EuclideanNorm" in kinds and "IdentityN" not in kinds, kinds
    # The value is the unfloored norm's (the channel's Nx is 0).
    gx = np.sqrt(((x * visible) ** 2).sum(axis=(1, 2), keepdims=True))
    nx = gx / (gx.mean(-1, keepdims=True) + 1e-6)
    gamma, beta = (w.numpy() for w in layer.trainable_variables)
    np.testing.assert_allclose(_np(layer(x, visible=visible)), x * (gamma * nx + 1) + beta, rtol=1e-5,
                               atol=1e-5)


def test_removed_pixels_never_reach_the_features_or_the_prediction(rng):
    # Strides 4, 2, 1, 1: "same"-padded windows cross patch borders here.
    model = tiny_fcmae(32)
    randomize(model, rng)
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    removed = fixed_masks(model, rng, 2)
    pixels_removed = np.kron(removed, np.ones((1, 8, 8)))[..., None]
    changed = images + rng.normal(size=images.shape).astype("float32") * 50 * pixels_removed
    assert np.abs(changed - images).max() > 1
    features = _np(model.encode(images, removed))
    np.testing.assert_array_equal(_np(model.encode(changed, removed)), features)
    pred = _np(model.decode(features, removed))
    np.testing.assert_array_equal(_np(model.decode(_np(model.encode(changed, removed)), removed)),
                                  pred)
    # A visible pixel does reach them.
    visible_pixel = np.argwhere(pixels_removed[0, ..., 0] == 0)[0]
    poked = images.copy()
    poked[0, visible_pixel[0], visible_pixel[1]] += 5.0
    assert np.abs(_np(model.encode(poked, removed)) - features).max() > 1e-4


def test_plain_forward_is_unchanged_by_the_shared_pass(rng):
    # Everything visible: the masked pass is the backbone's own output.
    model = tiny_fcmae(64)
    randomize(model, rng)
    images = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    out = _np(model.encode(images, np.zeros((2, *model.grid_shape), "float32")))
    np.testing.assert_allclose(out, _np(model.encoder(images)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_layer, stem", [("simple_norm", "patchify"), ("rms_norm", "overlap_act")])
def test_masked_pass_with_other_norms_and_stems(norm_layer, stem, rng):
    """The shared pass keeps its two properties with bias-free norms and an overlapping stem."""
    encoder = ConvNeXtBackbone(**TINY, image_shape=(64, 64, 3), norm_layer=norm_layer, stem=stem)
    model = FCMAE(encoder, decoder_dim=16, seed=1)
    randomize(model, rng)
    images = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    out = _np(model.encode(images, np.zeros((2, *model.grid_shape), "float32")))
    np.testing.assert_allclose(out, _np(model.encoder(images)), rtol=1e-5, atol=1e-5)
    removed = fixed_masks(model, rng, 2)
    patch = 64 // model.grid_shape[0]
    pixels_removed = np.kron(removed, np.ones((1, patch, patch)))[..., None]
    changed = images + rng.normal(size=images.shape).astype("float32") * 50 * pixels_removed
    np.testing.assert_array_equal(_np(model.encode(changed, removed)),
                                  _np(model.encode(images, removed)))


# === Masks, patches and the loss ===


def test_masks_are_drawn_per_sample_with_the_official_count():
    model = tiny_fcmae(64)  # strides 4, 2, 2, 1: 16 px patches on a 4x4 grid
    assert model.patch_size == 16 and model.num_kept == int(16 * 0.4)
    removed = _np(model.draw_masks(8))
    assert removed.shape == (8, 4, 4) and set(np.unique(removed)) <= {0.0, 1.0}
    np.testing.assert_array_equal(removed.reshape(8, -1).sum(1), 16 - model.num_kept)
    assert len({r.tobytes() for r in removed}) > 1
    maps = [_np(m) for m in model.visible_maps(removed)]
    assert [m.shape[1] for m in maps] == [64, 16, 8, 4, 4]
    for m in maps:
        factor = m.shape[1] // 4
        np.testing.assert_array_equal(m[..., 0], np.kron(1 - removed, np.ones((1, factor, factor))))


def test_patchify_matches_the_official_order_and_inverts(rng):
    model = tiny_fcmae(32)
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    patches = _np(model.patchify(images))
    # The official form, channels first: 'nchpwq->nhwpqc'.
    nchw = images.transpose(0, 3, 1, 2).reshape(2, 3, 4, 8, 4, 8)
    official = np.einsum("nchpwq->nhwpqc", nchw).reshape(2, 4, 4, 8 * 8 * 3)
    np.testing.assert_array_equal(patches, official)
    np.testing.assert_array_equal(_np(model.unpatchify(patches)), images)


def _loss_reference(images, pred, removed, p, norm_pix):
    n, h, w, c = images.shape
    target = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    target = target.reshape(n, h // p, w // p, -1).astype("float64")
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        target = (target - mean) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * removed).sum() / removed.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_counts_removed_patches_only(norm_pix, rng):
    model = tiny_fcmae(32, norm_pix_loss=norm_pix)
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32") * 3 + 1
    removed = fixed_masks(model, rng, 2)
    pred = rng.normal(size=(2, 4, 4, 192)).astype("float32")
    loss = float(_np(model.reconstruction_loss(images, pred, removed)))
    np.testing.assert_allclose(loss, _loss_reference(images, pred, removed, 8, norm_pix), rtol=1e-5)
    at_visible = pred + 10.0 * (1 - removed)[..., None]
    assert float(_np(model.reconstruction_loss(images, at_visible, removed))) == pytest.approx(loss, rel=1e-6)
    at_removed = pred + 10.0 * removed[..., None]
    assert float(_np(model.reconstruction_loss(images, at_removed, removed))) > loss + 1


def test_norm_pix_loss_normalises_each_patch(rng):
    model = tiny_fcmae(32)
    images = rng.uniform(size=(2, 32, 32, 3)).astype("float32")
    removed = fixed_masks(model, rng, 2)
    pred = rng.normal(size=(2, 4, 4, 192)).astype("float32")
    # A different gain and offset for every patch leaves the normalised target as it was.
    gain = np.kron(rng.uniform(0.5, 4, size=(2, 4, 4)), np.ones((1, 8, 8)))[..., None]
    offset = np.kron(rng.normal(size=(2, 4, 4)), np.ones((1, 8, 8)))[..., None]
    rescaled = (images * gain + offset).astype("float32")
    loss = float(_np(model.reconstruction_loss(images, pred, removed)))
    assert float(_np(model.reconstruction_loss(rescaled, pred, removed))) == pytest.approx(loss, rel=1e-3)
    plain = tiny_fcmae(32, norm_pix_loss=False)
    assert float(_np(plain.reconstruction_loss(rescaled, pred, removed))) != pytest.approx(
        float(_np(plain.reconstruction_loss(images, pred, removed))), rel=1e-2)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruct_undoes_the_patch_normalisation(norm_pix, rng):
    model = tiny_fcmae(32, norm_pix_loss=norm_pix)
    images = (rng.uniform(size=(2, 32, 32, 3)) * 3 - 1).astype("float32")
    removed = fixed_masks(model, rng, 2)
    target = images.reshape(2, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 4, 192)
    if norm_pix:  # the prediction a perfect decoder makes: the normalised target
        mean = target.mean(-1, keepdims=True)
        target = (target - mean) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(_np(model.reconstruct(images, target, removed)), images, atol=1e-5)
    # Visible patches are the input's whatever the prediction; removed ones are the prediction's.
    noise = rng.normal(size=target.shape).astype("float32")
    out = _np(model.reconstruct(images, noise, removed))
    pixels = np.kron(removed, np.ones((1, 8, 8)))[..., None].astype(bool)
    np.testing.assert_array_equal(np.where(pixels, 0, out), np.where(pixels, 0, images))
    assert np.abs(out - images)[np.broadcast_to(pixels, out.shape)].min() >= 0
    assert np.abs(out - images)[np.broadcast_to(pixels, out.shape)].mean() > 0.1


def test_save_and_load_fcmae_directory(rng, tmp_path):
    from convnext_zoo.fcmae import is_fcmae_directory, load_fcmae, save_fcmae

    model = tiny_fcmae(32, mask_ratio=0.5)
    randomize(model, rng)
    save_fcmae(model, tmp_path / "fcmae", metadata={"variant": "custom"})
    assert sorted(os.listdir(tmp_path)) == ["fcmae"] and is_fcmae_directory(tmp_path / "fcmae")
    images = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    # Another resolution: the same weights, but 16-px patches (strides 4, 2, 2, 1) need a new
    # prediction layer.
    loaded = load_fcmae(tmp_path / "fcmae", image_size=64, mask_ratio=0.75)
    assert loaded.grid_shape == (4, 4) and loaded.patch_size == 16 and loaded.mask_ratio == 0.75
    for name, variable in keras_variables(model).items():
        if not name.startswith("pred/"):
            np.testing.assert_array_equal(_np(keras_variables(loaded)[name]), _np(variable), err_msg=name)
    assert keras_variables(loaded)["pred/kernel"].shape == (16, 16 * 16 * 3)
    same = load_fcmae(tmp_path / "fcmae")
    removed = fixed_masks(model, rng, 2)
    small = images[:, :32, :32]
    np.testing.assert_array_equal(_np(same.decode(same.encode(small, removed), removed)),
                                  _np(model.decode(model.encode(small, removed), removed)))
    with pytest.raises(FileExistsError):
        save_fcmae(model, tmp_path / "fcmae")
    with pytest.raises(ValueError, match="is not an FCMAE directory"):
        load_fcmae(tmp_path)


# === Arguments ===


@pytest.mark.parametrize("kwargs, size, pattern", [
    ({"mask_ratio": 1.0}, 32, r"mask_ratio.*\(0, 1\).*Received: mask_ratio=1.0"),
    ({"mask_ratio": 0.0}, 32, r"\(0, 1\)"),
    ({"mask_ratio": 0.99}, 32, r"keeps 0 of the 16 patches"),
    ({}, 36, r"patch grid does not divide.*multiple of 8, e.g. 32"),
    ({"decoder_dim": 0}, 32, r"decoder_dim=0"),
])
def test_bad_arguments_raise_one_line_errors(kwargs, size, pattern):
    encoder = ConvNeXtBackbone(**TINY, image_shape=(size, size, 3))
    with pytest.raises(ValueError, match=pattern):
        FCMAE(encoder, **kwargs)


def test_encoder_must_be_a_fixed_size_backbone():
    with pytest.raises(ValueError, match="fixed image size"):
        FCMAE(ConvNeXtBackbone(**TINY))
    with pytest.raises(TypeError, match="ConvNeXtBackbone"):
        FCMAE(keras.Sequential([keras.layers.Dense(2)]))


def test_config_round_trip(rng, tmp_path):
    model = tiny_fcmae(32, mask_ratio=0.5)
    randomize(model, rng)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert (rebuilt.mask_ratio, rebuilt.decoder_dim, rebuilt.patch_size) == (0.5, 16, 8)
    model.save_weights(tmp_path / "fcmae.weights.h5")
    rebuilt.load_weights(tmp_path / "fcmae.weights.h5")
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    removed = fixed_masks(model, rng, 2)
    expected = _np(model.decode(model.encode(images, removed), removed))
    np.testing.assert_array_equal(_np(rebuilt.decode(rebuilt.encode(images, removed), removed)),
                                  expected)
    model.save(tmp_path / "fcmae.keras")
    loaded = keras.saving.load_model(tmp_path / "fcmae.keras")
    assert isinstance(loaded, convnext_zoo.FCMAE)
    np.testing.assert_array_equal(_np(loaded.decode(loaded.encode(images, removed), removed)),
                                  expected)


# === Other backends ===

BACKEND_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    import numpy as np
    import convnext_zoo
    from convnext_zoo.fcmae import FCMAE

    workdir, backend = sys.argv[1], sys.argv[2]
    assert keras.config.backend() == backend, keras.config.backend()
    with open(f"{workdir}/config.json") as f:
        model = keras.saving.deserialize_keras_object(json.load(f))
    model.load_weights(f"{workdir}/fcmae.weights.h5")
    data = np.load(f"{workdir}/data.npz")
    features = keras.ops.convert_to_numpy(model.encode(data["images"], data["removed"]))
    for i, expected in enumerate(data["reference"]):
        scale = max(1.0, np.abs(expected).max())
        diff = np.abs(features[i] - expected).max()
        assert diff <= 1e-5 * scale, f"sample {i}: {diff} from the sparse reference"
    pred = model.decode(features, data["removed"])
    loss = float(keras.ops.convert_to_numpy(
        model.reconstruction_loss(data["images"], pred, data["removed"])))
    assert abs(loss - float(data["loss"])) <= 1e-5 * abs(float(data["loss"])), (loss, data["loss"])
    print("ok", diff)
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_match_the_sparse_reference(backend, rng, tmp_path):
    model = tiny_fcmae(32)
    randomize(model, rng)
    images = rng.normal(size=(3, 32, 32, 3)).astype("float32")
    removed = fixed_masks(model, rng, 3)
    w = numpy_weights(model.encoder)
    reference = np.stack([
        sparse_encoder(w, images[i].astype("float64"), removed[i], model.encoder.strides,
                       TINY["depths"])
        for i in range(3)
    ])
    loss = _np(model.reconstruction_loss(images, model.decode(model.encode(images, removed), removed),
                                         removed))
    np.savez(tmp_path / "data.npz", images=images, removed=removed, reference=reference, loss=loss)
    model.save_weights(tmp_path / "fcmae.weights.h5")
    (tmp_path / "config.json").write_text(json.dumps(keras.saving.serialize_keras_object(model)))
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", BACKEND_SCRIPT, str(tmp_path), backend],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


# === Checkpoints ===


def official_fcmae_state_dict(depths, dims, decoder_dim, patch, rng, in_chans=3):
    """Random tensors under the official `models/fcmae.py` names, shaped as its modules are.

    The encoder is `SparseConvNeXtV2` (MinkowskiEngine: a conv kernel is
    `[k*k, in, out]`, a depthwise kernel `[k*k, C]`, biases `[1, C]`, GRN
    `[1, 4C]`, LayerNorm and Linear wrapped as `.ln` / `.linear`); the
    decoder is the dense `convnextv2.Block`.
    """
    def t(*shape):
        return rng.normal(size=shape).astype("float32")

    sd = {
        "encoder.downsample_layers.0.0.weight": t(dims[0], in_chans, 4, 4),
        "encoder.downsample_layers.0.0.bias": t(dims[0]),
        "encoder.downsample_layers.0.1.weight": t(dims[0]),
        "encoder.downsample_layers.0.1.bias": t(dims[0]),
    }
    for i in range(1, 4):
        sd[f"encoder.downsample_layers.{i}.0.ln.weight"] = t(dims[i - 1])
        sd[f"encoder.downsample_layers.{i}.0.ln.bias"] = t(dims[i - 1])
        sd[f"encoder.downsample_layers.{i}.1.kernel"] = t(4, dims[i - 1], dims[i])
        sd[f"encoder.downsample_layers.{i}.1.bias"] = t(1, dims[i])
    for s, (depth, d) in enumerate(zip(depths, dims)):
        for b in range(depth):
            p = f"encoder.stages.{s}.{b}."
            sd.update({
                p + "dwconv.kernel": t(49, d), p + "dwconv.bias": t(1, d),
                p + "norm.ln.weight": t(d), p + "norm.ln.bias": t(d),
                p + "pwconv1.linear.weight": t(4 * d, d), p + "pwconv1.linear.bias": t(4 * d),
                p + "grn.gamma": t(1, 4 * d), p + "grn.beta": t(1, 4 * d),
                p + "pwconv2.linear.weight": t(d, 4 * d), p + "pwconv2.linear.bias": t(d),
            })
    e = decoder_dim
    sd.update({
        "proj.weight": t(e, dims[-1], 1, 1), "proj.bias": t(e),
        "mask_token": t(1, e, 1, 1),
        "decoder.0.dwconv.weight": t(e, 1, 7, 7), "decoder.0.dwconv.bias": t(e),
        "decoder.0.norm.weight": t(e), "decoder.0.norm.bias": t(e),
        "decoder.0.pwconv1.weight": t(4 * e, e), "decoder.0.pwconv1.bias": t(4 * e),
        "decoder.0.grn.gamma": t(1, 1, 1, 4 * e), "decoder.0.grn.beta": t(1, 1, 1, 4 * e),
        "decoder.0.pwconv2.weight": t(e, 4 * e), "decoder.0.pwconv2.bias": t(e),
        "pred.weight": t(patch**2 * in_chans, e, 1, 1), "pred.bias": t(patch**2 * in_chans),
    })
    return sd


def test_an_official_fcmae_checkpoint_loads_fully(rng, tmp_path):
    torch = pytest.importorskip("torch")
    model = tiny_fcmae(32)
    sd = official_fcmae_state_dict(TINY["depths"], TINY["hidden_dims"], 16, 8, rng)
    # As the official training script saves it.
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 799},
               tmp_path / "fcmae.pt")
    model.load_official_weights(tmp_path / "fcmae.pt")
    w = {name: _np(v) for name, v in keras_variables(model).items()}
    # Minkowski's offset q * k + p is row p, column q.
    sparse = sd["encoder.downsample_layers.2.1.kernel"]
    dense = w["stages_2_downsample_1/kernel"]
    for p in range(2):
        for q in range(2):
            np.testing.assert_array_equal(dense[p, q], sparse[q * 2 + p])
    dw = sd["encoder.stages.3.0.dwconv.kernel"]
    np.testing.assert_array_equal(w["stages_3_blocks_0_conv_dw/kernel"][2, 5, :, 0], dw[5 * 7 + 2])
    np.testing.assert_array_equal(w["stages_0_blocks_0_mlp_fc1/kernel"],
                                  sd["encoder.stages.0.0.pwconv1.linear.weight"].T)
    np.testing.assert_array_equal(w["stages_1_blocks_0_mlp_grn/gamma"], sd["encoder.stages.1.0.grn.gamma"][0])
    np.testing.assert_array_equal(w["stem_0/kernel"],
                                  sd["encoder.downsample_layers.0.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(w["mask_token/mask_token"], sd["mask_token"].reshape(-1))
    np.testing.assert_array_equal(w["decoder_0_conv_dw/kernel"][..., 0],
                                  sd["decoder.0.dwconv.weight"][:, 0].transpose(1, 2, 0))
    np.testing.assert_array_equal(w["pred/kernel"], sd["pred.weight"][..., 0, 0].T)
    np.testing.assert_array_equal(w["decoder_0_mlp_grn/beta"], sd["decoder.0.grn.beta"].reshape(-1))
    # A missing or extra tensor is named.
    from convnext_zoo.weights import WeightMismatchError

    del sd["decoder.0.grn.beta"]
    sd["decoder.1.grn.beta"] = np.zeros((1, 1, 1, 64), "float32")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "bad.pt")
    with pytest.raises(WeightMismatchError, match=r"(?s)\+ unused.*decoder\.1\.grn\.beta.*- unassigned.*decoder_0_mlp_grn/beta"):
        model.load_official_weights(tmp_path / "bad.pt")


def test_an_official_fcmae_file_loads_through_from_preset_as_its_encoder(rng, tmp_path):
    """The reader pipeline: layout "fcmae" detected, the encoder loaded, the decoder deliberately unused."""
    torch = pytest.importorskip("torch")
    from convnext_zoo import pipeline
    from convnext_zoo.weights import WeightMismatchError

    dims = (40, 80, 160, 320)  # atto: the variant is read from the shapes
    sd = official_fcmae_state_dict((2, 2, 6, 2), dims, 16, 8, rng)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 799},
               tmp_path / "fcmae.pt")
    checkpoint = pipeline.read_source(str(tmp_path / "fcmae.pt"))
    config = checkpoint.config
    assert checkpoint.source_format == "fcmae"
    assert (config["family"], config["variant"], config["head"]) == ("v2", "atto", "none")
    encoder = convnext_zoo.from_preset(str(tmp_path / "fcmae.pt"), input_shape=(32, 32, 3))
    assert isinstance(encoder, ConvNeXtBackbone)
    # The same weights as the FCMAE loader's encoder (itself checked tensor by tensor above).
    full = FCMAE(convnext_zoo.create_convnext_v2("atto", include_top=False, input_shape=(32, 32, 3)),
                 decoder_dim=16)
    full.load_official_weights(tmp_path / "fcmae.pt")
    expected = keras_variables(full.encoder)
    loaded = keras_variables(encoder)
    assert set(loaded) == set(expected)
    for name, variable in loaded.items():
        np.testing.assert_array_equal(_np(variable), _np(expected[name]), err_msg=name)
    classifier = convnext_zoo.from_preset(str(tmp_path / "fcmae.pt"), num_classes=7,
                                          input_shape=(32, 32, 3), preprocessing=False)
    assert classifier.num_classes == 7
    # Only the decoder's keys are excused: a stray tensor is still reported.
    sd["encoder.extra.weight"] = np.zeros(3, "float32")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "stray.pt")
    with pytest.raises(WeightMismatchError, match=r"\+ unused source tensors \(1\): encoder\.extra\.weight"):
        convnext_zoo.from_preset(str(tmp_path / "stray.pt"))


def test_trained_encoder_saves_as_a_preset_that_fine_tunes(rng, tmp_path):
    encoder = convnext_zoo.create_convnext_v2("atto", include_top=False, input_shape=(32, 32, 3))
    model = FCMAE(encoder, decoder_dim=32, seed=0)
    images = rng.uniform(size=(4, 32, 32, 3)).astype("float32")
    randomize(model, rng)  # as training leaves them: no weight at its initial value
    convnext_zoo.save_preset(model.encoder, tmp_path / "encoder")
    classifier = convnext_zoo.from_preset(str(tmp_path / "encoder"), num_classes=5,
                                          input_shape=(32, 32, 3), preprocessing=False)
    assert classifier.num_classes == 5
    trained = keras_variables(model.encoder)
    loaded = keras_variables(classifier.backbone)
    assert set(loaded) == set(trained)
    for name, variable in trained.items():
        np.testing.assert_array_equal(_np(loaded[name]), _np(variable), err_msg=name)
    np.testing.assert_allclose(_np(classifier.backbone(images)), _np(model.encoder(images)),
                               rtol=1e-5, atol=1e-5)


def test_a_registered_fcmae_preset_builds_into_the_encoder():
    model = FCMAE.from_preset("convnext_v2_atto_fcmae", image_size=32, load_weights=False)
    assert (model.encoder.depths, model.encoder.hidden_dims) == ([2, 2, 6, 2], [40, 80, 160, 320])
    assert model.grid_shape == (4, 4) and model.patch_size == 8
    assert model.decoder.get_layer("pred").kernel.shape == (512, 8 * 8 * 3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"])
def test_every_registered_fcmae_preset_builds_into_the_encoder(variant):
    from convnext_zoo.variants import V2_VARIANTS

    model = FCMAE.from_preset(f"convnext_v2_{variant}_fcmae", image_size=224, load_weights=False)
    assert (tuple(model.encoder.depths), tuple(model.encoder.hidden_dims)) == V2_VARIANTS[variant]
    assert model.grid_shape == (7, 7) and model.patch_size == 32
    expected = convnext_zoo.preset_info(f"convnext_v2_{variant}_fcmae")["params"]
    assert model.encoder.count_params() == expected


# === Training ===

TRAIN_SCRIPT = textwrap.dedent(
    """
    import glob, sys
    import keras
    import numpy as np
    from PIL import Image
    from convnext_zoo import ConvNeXtBackbone
    from convnext_zoo.fcmae import FCMAE

    data_dir, backend = sys.argv[1], sys.argv[2]
    assert keras.config.backend() == backend, keras.config.backend()
    files = sorted(glob.glob(f"{data_dir}/train/*/*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB"), "float32") for f in files])
    images = (images / 255.0 - 0.5) / 0.25
    keras.utils.set_random_seed(0)
    encoder = ConvNeXtBackbone(depths=(1, 1, 2, 1), hidden_dims=(16, 32, 48, 64), use_grn=True,
                               layer_scale_init_value=None, image_shape=(32, 32, 3))
    model = FCMAE(encoder, decoder_dim=64, seed=0)
    # Judged on fixed masks: the training loss draws new ones every step.
    rng = np.random.default_rng(0)
    removed = np.ones((len(images), model.num_patches), "float32")
    for row in removed:
        row[rng.permutation(model.num_patches)[:model.num_kept]] = 0
    removed = removed.reshape((-1, *model.grid_shape))

    def loss():
        pred = model.decode(model.encode(images, removed), removed)
        return float(keras.ops.convert_to_numpy(model.reconstruction_loss(images, pred, removed)))

    before = loss()
    model.compile(optimizer=keras.optimizers.AdamW(2e-3))
    history = model.fit(images, epochs=8, batch_size=25, verbose=0)
    after = loss()
    assert np.isfinite(history.history["loss"]).all(), history.history
    assert after < 0.8 * before, (before, after, history.history["loss"])
    print("ok", len(images), before, after)
    """
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from write_digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    assert write_digits(str(root), per_class=20)["train"] == 200
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_pretraining_on_digits_lowers_the_loss(backend, digits):
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(digits), backend],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok"), result.stdout
    print(result.stdout)
