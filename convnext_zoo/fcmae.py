"""FCMAE: ConvNeXt V2's masked pre-training, dense, on every Keras backend.

`FCMAE` wraps a `ConvNeXtBackbone` (the encoder, whose weights save as a
normal preset) and the official decoder: a 1x1 projection to the decoder
width, a learned mask token at the removed positions, one plain ConvNeXt V2
block of 512 channels and a 1x1 prediction of each patch's pixels. The loss
is the mean squared error over the removed patches only, each target patch
normalised by its own mean and (unbiased) variance (`norm_pix_loss`).

Masks. One mask per sample on the last stage's grid (a patch is one last-stage
position: 32 px at 224 px input), `int(L * (1 - mask_ratio))` of the `L`
patches kept, repeated up to each stage's grid and to the input's pixels.
The grid follows the backbone's strides: where the small-input rule lowers
them (`convnext_zoo.variants.plan_strides`), the patches shrink with them
(8 px at 32 px input, strides 4, 2, 1, 1).

Semantics: the dense form of the sparse encoder. The official encoder runs
on MinkowskiEngine sparse tensors that hold the visible positions only. Its
dense equivalent here (`ConvNeXtBackbone.masked_features`, one forward pass
shared with the plain network) is:

* the image's removed patches are zeroed before the stem, and every block's
  input is masked. The official stem sees the whole image, but its 4x4
  stride-4 windows never cross a patch, so its visible outputs are the same;
  with lowered strides (a "same"-padded stem or downsampling) windows do
  cross patches, and without this the visible features would see the
  removed pixels at patch borders;
* each block's depthwise convolution is masked before and after (a sparse
  convolution has no output at removed positions and reads none);
* GRN's `||x||` runs over each sample's visible positions only;
* the downsampling convolution reads zeros at removed positions (its
  LayerNorm would otherwise give them its bias), and every stage's output is
  zero at removed positions (the sparse tensor's dense view).

Pointwise layers (LayerNorm, the MLP) compute garbage at removed positions,
which never reaches a visible one: `tests/test_fcmae.py` checks this against
an independent gather/scatter reference and by perturbing removed inputs.

Where the official sparse code differs: `MinkowskiGRN` takes the norm over
all points of the sparse tensor, which holds the whole batch, so each
sample's GRN statistics pool every sample in the batch (ConvNeXt-V2 issue
86, pull request 85). This package follows the per-sample definition, for
three reasons: it is GRN as the paper defines it and as the dense network
computes it when fine-tuned and deployed (the statistics the pre-trained
GRN weights meet later); it makes a sample's features independent of its
batch-mates, so results do not change with the batch size or the split of
a batch over devices; and `Nx = Gx / mean(Gx)` is invariant to a common
scale, so the batch pooling changes the relative channel responses (an
average over the batch), not their size. Checkpoints trained either way
load the same; continuing an official run here changes only this.

Saving: the encoder is a preset (`convnext_zoo.save_preset(model.encoder,
...)`); `save_fcmae` / `load_fcmae` write and read the whole model (config
and every weight, atomically), as `convnext-zoo pretrain` does
(`convnext_zoo.pretrain`). An official pre-training file loads with
`load_official_weights`, or through `convnext_zoo.from_preset` as its
encoder alone (`convnext_zoo.readers`, format "fcmae").

One other deliberate difference: every decoder weight starts as this
package's truncated normal of std 0.02 (the official `_init_weights` calls
`trunc_normal_` with its default std of 1.0 on the decoder's convolutions
and leaves the decoder MLP at PyTorch's default).

Example:
    >>> encoder = convnext_zoo.create_convnext_v2(
    ...     "atto", include_top=False, input_shape=(32, 32, 3))
    >>> model = FCMAE(encoder)
    >>> model.patch_size, model.grid_shape
    (8, (4, 4))
    >>> model.compile(optimizer="adamw")
    >>> model.fit(images, epochs=1)  # doctest: +SKIP
"""

import json
import math
import os

import keras
from keras import ops

from convnext_zoo import layout, preset_dir, weights
from convnext_zoo.backbone import ConvNeXtBackbone, block_forward, conv_initializer
from convnext_zoo.checkpoint_io import SafetensorsReader, open_source
from convnext_zoo.distribute import OptimizerBuiltFirst
from convnext_zoo.layers import MaskToken, PointwiseDense
from convnext_zoo.readers import converted_tensor
from convnext_zoo.weights import assign_strict, keras_variables

NORM_PIX_EPSILON = 1e-6
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DIRECTORY_FORMAT = "convnext_zoo.fcmae"


def _validate(encoder, decoder_dim, decoder_depth, mask_ratio):
    if not isinstance(encoder, ConvNeXtBackbone):
        raise TypeError(
            f"FCMAE's encoder must be a convnext_zoo ConvNeXtBackbone. Received: "
            f"{type(encoder).__name__}. Build one with convnext_zoo.create_convnext_v2(..., "
            "include_top=False, input_shape=(size, size, 3)) or ConvNeXtBackbone.from_preset."
        )
    height, width = encoder.image_shape[:2]
    if height is None or width is None:
        raise ValueError(
            "FCMAE needs a fixed image size (its mask grid depends on it). Received an "
            f"encoder with image_shape={encoder.image_shape}. Build the encoder with "
            "input_shape=(size, size, 3)."
        )
    patch = math.prod(encoder.strides)
    if height % patch or width % patch:
        raise ValueError(
            f"The patch grid does not divide the image: image_shape={encoder.image_shape}, "
            f"patch size {patch} (the encoder's total stride, strides {encoder.strides}). "
            f"Use an image size that is a multiple of {patch}, e.g. {max(1, height // patch) * patch}."
        )
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(
            f"`mask_ratio` must be in (0, 1). Received: mask_ratio={mask_ratio}. "
            "The official value is 0.6."
        )
    patches = (height // patch) * (width // patch)
    kept = int(patches * (1.0 - float(mask_ratio)))
    if kept < 1 or kept == patches:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps {kept} of the {patches} patches "
            f"({height // patch}x{width // patch} grid); at least one must be kept and one "
            "removed. Choose a ratio between "
            f"{1 / patches:.3f} and {1 - 1 / patches:.3f}, or a larger image."
        )
    if int(decoder_dim) < 1 or int(decoder_depth) < 1:
        raise ValueError(
            "The decoder needs at least one block of at least one channel. Received: "
            f"decoder_dim={decoder_dim}, decoder_depth={decoder_depth}."
        )


def _patch_statistics(patches):
    """Each patch's mean and `sqrt(var + eps)`, the variance unbiased (torch.var in the official loss)."""
    mean = ops.mean(patches, axis=-1, keepdims=True)
    n = patches.shape[-1]
    var = ops.sum(ops.square(patches - mean), axis=-1, keepdims=True) / (n - 1)
    return mean, ops.sqrt(var + NORM_PIX_EPSILON)


def _decoder(grid, encoder_dim, pixels, decoder_dim, decoder_depth, dtype):
    """The official decoder as a functional model: (features, removed) -> patch pixels."""
    features = keras.Input(shape=(*grid, encoder_dim), name="features")
    removed = keras.Input(shape=(*grid, 1), name="removed")
    x = PointwiseDense(decoder_dim, kernel_initializer=conv_initializer(), dtype=dtype,
                       name="proj")(features)
    x = MaskToken(dtype=dtype, name="mask_token")(x, removed)
    for index in range(decoder_depth):
        x = block_forward(x, decoder_dim, use_grn=True, layer_scale_init_value=None,
                          drop_path_rate=0.0, dtype=dtype, name=f"decoder_{index}")
    x = PointwiseDense(pixels, kernel_initializer=conv_initializer(), dtype=dtype,
                       name="pred")(x)
    return keras.Model([features, removed], x, name="decoder")


@keras.saving.register_keras_serializable(package="convnext_zoo")
class FCMAE(OptimizerBuiltFirst, keras.Model):
    """Fully convolutional masked autoencoder around a ConvNeXt backbone.

    `call(images)` draws a mask per sample and returns
    `{"pred": (batch, gh, gw, patch_size**2 * channels), "removed": (batch, gh, gw)}`;
    `compile(optimizer=...)` then `fit(images)` trains on the reconstruction
    loss (labels, if the data has them, are ignored). `encoder` is the
    backbone: save it with `convnext_zoo.save_preset` to fine-tune it.

    Args:
        encoder: a `ConvNeXtBackbone` with a fixed `image_shape`; its total
            stride is the patch size.
        decoder_dim: channels of the decoder (official: 512).
        decoder_depth: ConvNeXt V2 blocks in the decoder (official: 1).
        mask_ratio: fraction of patches removed, in (0, 1) (official: 0.6).
        norm_pix_loss: normalise each target patch by its mean and std.
        seed: seed of the mask generator.

    Example:
        >>> encoder = convnext_zoo.create_convnext_v2(
        ...     "atto", include_top=False, input_shape=(64, 64, 3))
        >>> out = FCMAE(encoder)(keras.ops.zeros((2, 64, 64, 3)))
        >>> keras.ops.shape(out["pred"]), keras.ops.shape(out["removed"])
        ((2, 4, 4, 768), (2, 4, 4))
    """

    def __init__(self, encoder, decoder_dim=512, decoder_depth=1, mask_ratio=0.6,
                 norm_pix_loss=True, seed=None, **kwargs):
        _validate(encoder, decoder_dim, decoder_depth, mask_ratio)
        super().__init__(**kwargs)
        height, width, channels = encoder.image_shape
        self.patch_size = math.prod(encoder.strides)
        self.grid_shape = (height // self.patch_size, width // self.patch_size)
        self.channels = channels
        self.encoder = encoder
        self.decoder = _decoder(
            self.grid_shape, encoder.hidden_dims[-1], self.patch_size**2 * channels,
            int(decoder_dim), int(decoder_depth), self.dtype_policy,
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.decoder_dim = int(decoder_dim)
        self.decoder_depth = int(decoder_depth)
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.seed = seed
        # Encoder and decoder are functional, built above: every variable exists.
        self.built = True

    @property
    def num_patches(self):
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def num_kept(self):
        """Visible patches per sample: `int(num_patches * (1 - mask_ratio))`, as officially."""
        return int(self.num_patches * (1.0 - self.mask_ratio))

    def draw_masks(self, batch_size):
        """Random masks, `(batch, gh, gw)`: 1 removed, 0 visible, `num_kept` zeros each.

        Each sample ranks uniform noise over its patches and keeps the
        `num_kept` lowest (the official argsort of the noise).
        """
        noise = keras.random.uniform((batch_size, self.num_patches), seed=self.seed_generator)
        ranks = ops.argsort(ops.argsort(noise, axis=-1), axis=-1)
        removed = ops.cast(ranks >= self.num_kept, "float32")
        return ops.reshape(removed, (-1, *self.grid_shape))

    def visible_maps(self, removed):
        """The five `(batch, h, w, 1)` visible maps `masked_features` takes.

        At the input's pixels, then at each stage's grid: the patch grid
        repeated by the strides still to come.
        """
        visible = 1.0 - ops.cast(removed, "float32")[..., None]
        strides = self.encoder.strides
        maps = []
        for index in range(5):
            factor = math.prod(strides[index:])
            grid = visible
            if factor > 1:
                grid = ops.repeat(ops.repeat(grid, factor, axis=1), factor, axis=2)
            maps.append(ops.cast(grid, self.compute_dtype))
        return maps

    def encode(self, images, removed, training=None):
        """The encoder's last feature map with `removed` patches taken out (zeros there)."""
        return self.encoder.masked_features(images, self.visible_maps(removed), training=training)

    def decode(self, features, removed, training=None):
        """Predicted pixels of every patch, `(batch, gh, gw, patch_size**2 * channels)`."""
        removed = ops.cast(removed, self.compute_dtype)[..., None]
        return self.decoder([ops.convert_to_tensor(features), removed], training=training)

    def call(self, images, training=None):
        removed = self.draw_masks(ops.shape(images)[0])
        pred = self.decode(self.encode(images, removed, training), removed, training)
        return {"pred": pred, "removed": removed}

    def patchify(self, images):
        """`(batch, H, W, C)` -> `(batch, gh, gw, p*p*C)`, pixels in (row, column, channel) order.

        The order of the official `patchify` (and of its prediction layer).
        """
        p, (gh, gw), c = self.patch_size, self.grid_shape, self.channels
        x = ops.reshape(images, (-1, gh, p, gw, p, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, gh, gw, p * p * c))

    def unpatchify(self, patches):
        """Inverse of `patchify`: `(batch, gh, gw, p*p*C)` -> `(batch, H, W, C)`."""
        p, (gh, gw), c = self.patch_size, self.grid_shape, self.channels
        x = ops.reshape(patches, (-1, gh, gw, p, p, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, gh * p, gw * p, c))

    def reconstruction_loss(self, images, pred, removed):
        """Mean squared error over the removed patches (per-patch normalised target).

        Args:
            images: the input batch.
            pred: `decode`'s output.
            removed: the masks, `(batch, gh, gw)`, 1 removed.
        """
        target = self.patchify(ops.cast(images, "float32"))
        if self.norm_pix_loss:
            mean, std = _patch_statistics(target)
            target = (target - mean) / std
        per_patch = ops.mean(ops.square(ops.cast(pred, "float32") - target), axis=-1)
        removed = ops.cast(removed, "float32")
        return ops.sum(per_patch * removed) / ops.sum(removed)

    def reconstruct(self, images, pred, removed):
        """Images with the removed patches replaced by the prediction, in the input's units.

        With `norm_pix_loss` the prediction is of normalised patches: each is
        mapped back with its original patch's mean and (unbiased) std, as
        the loss normalised the target.

        Args:
            images: the input batch.
            pred: `decode`'s output.
            removed: the masks, `(batch, gh, gw)`, 1 removed.
        """
        target = self.patchify(ops.cast(images, "float32"))
        pred = ops.cast(pred, "float32")
        if self.norm_pix_loss:
            mean, std = _patch_statistics(target)
            pred = pred * std + mean
        removed = ops.cast(removed, "float32")[..., None]
        return self.unpatchify(pred * removed + target * (1.0 - removed))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.reconstruction_loss(x, y_pred["pred"], y_pred["removed"])

    @classmethod
    def from_preset(cls, preset, image_size=224, load_weights=True, **kwargs):
        """An FCMAE whose encoder is a preset's backbone (e.g. "convnext_v2_atto_fcmae").

        The decoder starts fresh: the registered FCMAE presets hold the
        encoder only. `load_official_weights` loads an official
        pre-training file with its decoder.

        Args:
            preset: anything `ConvNeXtBackbone.from_preset` takes.
            image_size: the pre-training resolution (int or `(height, width)`).
            load_weights: `False` builds the architecture only (offline).
            **kwargs: `FCMAE`'s other arguments.
        """
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        encoder = ConvNeXtBackbone.from_preset(
            preset, load_weights=load_weights, input_shape=(*size, 3)
        )
        return cls(encoder, **kwargs)

    def load_official_weights(self, path, checkpoint_key=None):
        """Loads an official FCMAE pre-training checkpoint: encoder, decoder and mask token.

        The file of facebookresearch/ConvNeXt-V2's `models/fcmae.py`
        (`torch.save({"model": state_dict, ...})`, e.g.
        `convnextv2_atto_1k_224_fcmae.pt`), or the same state dict as
        safetensors. The sparse encoder's MinkowskiEngine tensors are
        converted (`convnext_zoo.layout.fcmae_to_keras_name`), and every
        tensor must find its variable and every variable its tensor.

        Args:
            path: the checkpoint file.
            checkpoint_key: the entry holding the weights in a training
                checkpoint (default: "model").
        """
        reader = open_source(path, checkpoint_key)
        tensors = [converted_tensor(reader, key, layout.fcmae_to_keras_name(key)) for key in reader.keys()]
        assign_strict(keras_variables(self), tensors, source=str(path))

    def get_config(self):
        config = super().get_config()
        config.update({
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder_dim": self.decoder_dim,
            "decoder_depth": self.decoder_depth,
            "mask_ratio": self.mask_ratio,
            "norm_pix_loss": self.norm_pix_loss,
            "seed": self.seed,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)


def save_fcmae(model, output_dir, overwrite=False, metadata=None):
    """Writes a whole FCMAE (encoder, decoder, mask token) as a directory, atomically.

    `config.json` holds the Keras config of the model (`FCMAE.get_config`)
    under `"fcmae"`, `model.safetensors` every weight under its Keras name;
    `load_fcmae` rebuilds it. The encoder alone is a preset
    (`convnext_zoo.save_preset(model.encoder, ...)`).

    Args:
        model: an `FCMAE` (float32 weights are written as they are).
        output_dir: the directory to create.
        overwrite: replace an existing `output_dir`.
        metadata: JSON-serialisable facts kept beside the config (e.g. the run).
    """
    with preset_dir.atomic_directory(output_dir, overwrite) as tmp:
        document = {"format": DIRECTORY_FORMAT, "fcmae": keras.saving.serialize_keras_object(model),
                    "metadata": metadata or {}}
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1)
        weights.save_weights(model, os.path.join(tmp, WEIGHTS_FILE))
        # Read back through the loader: a directory that does not reload is never published.
        load_fcmae(tmp)


def is_fcmae_directory(path):
    """True for a directory `save_fcmae` wrote."""
    config = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as handle:
            return json.load(handle).get("format") == DIRECTORY_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_fcmae(path, image_size=None, load_weights=True, **overrides):
    """The `FCMAE` of a `save_fcmae` directory, every weight loaded strictly.

    Args:
        path: the directory.
        image_size: build for another resolution (int or `(height, width)`).
            The weights do not depend on it, except the prediction layer's
            when the patch size changes with it (small inputs lower the
            strides): that layer is then freshly initialised.
        load_weights: `False` builds the architecture only.
        **overrides: other `FCMAE` arguments (`mask_ratio`, `seed`, ...).

    Example:
        >>> model = load_fcmae("pretrained/fcmae")  # doctest: +SKIP
        >>> convnext_zoo.save_preset(model.encoder, "encoder")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not is_fcmae_directory(path):
        raise ValueError(
            f"{path} is not an FCMAE directory (no {CONFIG_FILE} with format "
            f"{DIRECTORY_FORMAT!r}). Pass the `fcmae` folder `convnext-zoo pretrain` writes."
        )
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as handle:
        document = json.load(handle)
    config = document["fcmae"]
    encoder = config["config"]["encoder"]["config"]
    # The dtype policy is the caller's (written from a float32 copy).
    config["config"].pop("dtype", None)
    encoder.pop("dtype", None)
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        encoder["image_shape"] = [*size, encoder["image_shape"][-1]]
    config["config"].update(overrides)
    model = keras.saving.deserialize_keras_object(config)
    if load_weights:
        path = os.path.join(path, WEIGHTS_FILE)
        # At another resolution the patches can change size (the strides
        # follow the input): the prediction layer then starts afresh.
        saved = SafetensorsReader(path).shape("pred/bias")[0]
        fresh = ("pred/",) if saved != model.decoder.get_layer("pred").bias.shape[0] else ()
        weights.load_weights(model, path, allow_unused=fresh, allow_unassigned=fresh)
    return model
