"""`ConvNeXtBackbone`: the ConvNeXt V1/V2 feature extractor as a keras-hub backbone."""

import collections
import math

import keras
import numpy as np
from keras import layers
from keras_hub.models import FeaturePyramidBackbone

from convnext_zoo import pipeline
from convnext_zoo.inference import PortableExport, SingleBatchPredict
from convnext_zoo.internals import deferred_while_loading, loading_weights
from convnext_zoo.layers import (
    Conv2D,
    DepthwiseConv2D,
    DropPath,
    ExactGelu,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    channel_norm,
)
from convnext_zoo.variants import (
    MIN_INPUT_SIZE,
    NORM_EPSILON,
    STEMS,
    check_options,
    plan_strides,
    stem_width,
)

LAYER_NORM_EPSILON = NORM_EPSILON


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvInitializer(keras.initializers.TruncatedNormal):
    """Truncated normal (`TruncatedNormal` config), zeros while weights are being loaded.

    Only where Keras cannot defer variables (see
    `convnext_zoo.internals.weights_to_be_loaded`): drawing random numbers
    that the loader overwrites next would be wasted work.

    On the JAX backend the values are drawn in chunks of a few fixed sizes:
    `jax.random.truncated_normal` compiles for about half a second per new
    shape, which was 9.5 of the 13 s that building a small V2 model took
    (17 kernel shapes); in chunks a model compiles it at most twice. The
    distribution is the same, the values are not those of the other backends.
    """

    CHUNK_SIZES = (2**16, 2**22)

    def __call__(self, shape, dtype=None):
        if loading_weights():
            return keras.ops.zeros(shape, dtype=dtype)
        if keras.config.backend() != "jax" or not isinstance(self.seed, int):
            return super().__call__(shape, dtype=dtype)
        import jax

        size = math.prod(shape)
        chunk = next((c for c in self.CHUNK_SIZES if size <= c), self.CHUNK_SIZES[-1])
        # One independent seed per chunk, all from the initializer's seed.
        seeds = np.random.SeedSequence(self.seed % 2**32).generate_state(-(-size // chunk))
        parts = [keras.random.truncated_normal((chunk,), mean=self.mean, stddev=self.stddev, seed=int(seed))
                 for seed in seeds]
        try:
            parts = [np.asarray(part) for part in parts]
        except jax.errors.TracerArrayConversionError:
            # Traced: Keras jits the initializers of the variables it shards at
            # creation (over 250 MB on all devices); compiled once per shape anyway.
            return super().__call__(shape, dtype=dtype)
        values = np.concatenate(parts)[:size].reshape(shape)
        return keras.ops.convert_to_tensor(values, dtype=dtype or keras.config.floatx())


def conv_initializer():
    """Truncated normal, std 0.02: the official init of every conv and dense."""
    return ConvInitializer(stddev=0.02)


def _validate(depths, hidden_dims, drop_path_rate, image_shape):
    if len(depths) != 4 or len(hidden_dims) != 4:
        raise ValueError(
            "ConvNeXt has four stages: `depths` and `hidden_dims` need four "
            f"entries each. Received: depths={depths}, hidden_dims={hidden_dims}."
        )
    if any(int(d) < 1 for d in depths) or any(int(d) < 1 for d in hidden_dims):
        raise ValueError(
            "Every stage needs at least one block and one channel. Received: "
            f"depths={depths}, hidden_dims={hidden_dims}."
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(
            f"`drop_path_rate` must be in [0, 1). Received: "
            f"drop_path_rate={drop_path_rate}. Use 0.0 to switch stochastic "
            "depth off; the official recipes use 0.1 to 0.5."
        )
    if len(image_shape) != 3:
        raise ValueError(
            "`image_shape` must be (height, width, channels), channels last. "
            f"Received: image_shape={image_shape}."
        )
    height, width, channels = image_shape
    if channels is None or int(channels) < 1:
        raise ValueError(
            "The number of input channels must be known and positive. "
            f"Received: image_shape={image_shape}. Use e.g. (None, None, 3)."
        )
    for side in (height, width):
        if side is not None and int(side) < MIN_INPUT_SIZE:
            raise ValueError(
                f"Input too small: ConvNeXt needs at least {MIN_INPUT_SIZE} px "
                f"per side. Received: image_shape={image_shape}. Resize the "
                f"images to {MIN_INPUT_SIZE} px or more, or use "
                "(None, None, channels) and feed larger images."
            )


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvNeXtBackbone(PortableExport, SingleBatchPredict, FeaturePyramidBackbone):
    """ConvNeXt V1 or V2 backbone, channels last.

    Stem (4x4 conv, LayerNorm, by default), then four stages of ConvNeXt blocks with a
    LayerNorm + 2x2 conv downsampling before stages 1-3. A block is a 7x7
    depthwise conv, LayerNorm, Dense(4d), GELU, [V2: GRN], Dense(d),
    [V1: layer scale], drop path and the residual. The output is the last
    stage's feature map; `pyramid_outputs` holds the four stage outputs as
    "P2".."P5" (strides 4, 8, 16, 32 at standard resolutions).

    Layer names are timm's state dict module names with dots replaced by
    underscores (`stem_0`, `stages_2_downsample_1`,
    `stages_2_blocks_5_mlp_fc1`, ...; PyTorch-backed Keras forbids dots in
    names), so the mapping to checkpoints is mechanical.

    Args:
        depths: blocks per stage, four ints.
        hidden_dims: channels per stage, four ints.
        use_grn: True for ConvNeXt V2 (Global Response Normalization in the MLP).
        layer_scale_init_value: initial layer scale (V1: 1e-6). `None` or 0
            builds no layer scale (V2).
        drop_path_rate: final stochastic depth rate; the rate rises linearly
            from 0 over all blocks.
        image_shape: `(height, width, channels)`; `None` sides accept any size.
        adapt_small_inputs: lower the stem and downsampling strides for small
            static inputs so the last feature map keeps at least 4 px
            (never at 128 px and above; see `convnext_zoo.variants.plan_strides`).
        stem: "patchify" (official), or one of timm's overlapping stems
            "overlap", "overlap_tiered", "overlap_act" (the `_ols` models;
            see `convnext_zoo.variants.STEMS`).
        norm_layer: kind of every norm of the network: "layer_norm",
            "simple_norm" or "rms_norm" (timm's zepto_rms / atto_rms; see
            `convnext_zoo.variants.NORM_LAYERS`). A classifier's head norm
            follows it.
        norm_epsilon: epsilon of every norm (1e-6; timm's xxlarge 1e-5).
        conv_mlp: the checkpoint stores the block MLPs as 1x1 convolutions
            (timm's small models): the same network, recorded so that
            timm-format writing restores that layout.
        dtype: dtype policy of every layer (e.g. "mixed_float16").

    Example:
        >>> backbone = ConvNeXtBackbone(
        ...     depths=(1, 1, 1, 1), hidden_dims=(8, 16, 24, 32), use_grn=True,
        ...     layer_scale_init_value=None, image_shape=(64, 64, 3))
        >>> backbone.output.shape
        (None, 4, 4, 32)
    """

    def __init__(
        self,
        depths,
        hidden_dims,
        use_grn=False,
        layer_scale_init_value=1e-6,
        drop_path_rate=0.0,
        image_shape=(None, None, 3),
        adapt_small_inputs=True,
        stem="patchify",
        norm_layer="layer_norm",
        norm_epsilon=NORM_EPSILON,
        conv_mlp=False,
        dtype=None,
        **kwargs,
    ):
        depths = [int(d) for d in depths]
        hidden_dims = [int(d) for d in hidden_dims]
        image_shape = tuple(None if s is None else int(s) for s in image_shape)
        _validate(depths, hidden_dims, drop_path_rate, image_shape)
        check_options(stem, norm_layer, norm_epsilon)
        strides = plan_strides(image_shape[0], image_shape[1], adapt_small_inputs, stem)
        plan = Plan(depths, hidden_dims, use_grn, layer_scale_init_value,
                    drop_rates(depths, drop_path_rate), strides, dtype,
                    stem, norm_layer, float(norm_epsilon))

        # === Functional model ===
        with deferred_while_loading():
            inputs = keras.Input(shape=image_shape, name="images")
            x, pyramid_outputs = network(inputs, plan)
        super().__init__(inputs=inputs, outputs=x, dtype=dtype, **kwargs)

        # === Config ===
        self.depths = depths
        self.hidden_dims = hidden_dims
        self.use_grn = use_grn
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.image_shape = image_shape
        self.adapt_small_inputs = adapt_small_inputs
        self.stem = stem
        self.norm_layer = norm_layer
        self.norm_epsilon = float(norm_epsilon)
        self.conv_mlp = bool(conv_mlp)
        self.strides = strides
        self.pyramid_outputs = pyramid_outputs

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """The backbone of a preset: registered name, alias, `hf://`, directory or file.

        Uses convnext_zoo's registry and loading pipeline
        (`convnext_zoo.from_preset` with `include_top=False`), not
        keras-hub's built-in presets; a keras-hub preset directory of this
        class loads too.

        Example:
            >>> backbone = ConvNeXtBackbone.from_preset("convnext_v2_atto")  # doctest: +SKIP
        """
        kwargs.setdefault("preprocessing", False)
        return pipeline.load(
            preset, cls, None, include_top=False, pooling=None, load_weights=load_weights, **kwargs
        )

    def masked_features(self, images, visible, training=None):
        """The last feature map with removed positions (FCMAE's masked encoder).

        Runs `network` over this backbone's own layers and weights, so a
        pre-trained encoder is this backbone. `convnext_zoo.fcmae.FCMAE`
        draws the masks; see its module docstring for the semantics.

        Args:
            images: `(batch, height, width, channels)` at `image_shape`.
            visible: five `(batch, h, w, 1)` maps of 1 (visible) and 0
                (removed): at the input's resolution and at each stage's.
            training: drop path on or off.

        Returns:
            The last stage's features, zero at removed positions.
        """
        by_name = {layer.name: layer for layer in self.layers}
        plan = Plan(self.depths, self.hidden_dims, self.use_grn, self.layer_scale_init_value,
                    drop_rates(self.depths, self.drop_path_rate), self.strides, None,
                    self.stem, self.norm_layer, self.norm_epsilon)
        images = keras.ops.cast(images, self.compute_dtype)
        features, _ = network(
            images, plan, lambda name, create: by_name.get(name), visible, training
        )
        return features

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "depths": self.depths,
                "hidden_dims": self.hidden_dims,
                "use_grn": self.use_grn,
                "layer_scale_init_value": self.layer_scale_init_value,
                "drop_path_rate": self.drop_path_rate,
                "image_shape": self.image_shape,
                "adapt_small_inputs": self.adapt_small_inputs,
                "stem": self.stem,
                "norm_layer": self.norm_layer,
                "norm_epsilon": self.norm_epsilon,
                "conv_mlp": self.conv_mlp,
            }
        )
        return config


Plan = collections.namedtuple(
    "Plan",
    "depths hidden_dims use_grn layer_scale_init_value drop_rates strides dtype "
    "stem norm_layer norm_epsilon",
    defaults=("patchify", "layer_norm", NORM_EPSILON),
)
Plan.__doc__ = "What `network` needs to know: the architecture, strides and dtype policy."


def drop_rates(depths, drop_path_rate):
    """Stochastic depth rate of every block: rising linearly from 0 to `drop_path_rate`."""
    total_blocks = sum(depths)
    return [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]


def _create(name, create):
    """`network`'s layer source while a network is built: a new layer."""
    return create()


def network(images, plan, layer=_create, visible=None, training=None):
    """ConvNeXt's forward pass, written once for two uses.

    While the backbone is built, `layer` creates each layer and the pass
    wires the functional graph. FCMAE's encoder
    (`ConvNeXtBackbone.masked_features`) runs the same pass over the built
    backbone's own layers with removed positions: the stem's input and every
    block's input are masked, the depthwise convolution's output too, GRN
    takes its statistics over each sample's visible positions only, and the
    downsampling convolution sees zeros where positions are removed. That is
    the dense form of the sparse encoder (see `convnext_zoo.fcmae`).

    Args:
        images: the input batch (symbolic while building).
        plan: a `Plan`.
        layer: `layer(name, create)` returns the layer called `name`: by
            default `create()`; in masked mode the built backbone's layer,
            or `None` where it has none (no drop path at rate 0).
        visible: `None` for the plain network, or five `(batch, h, w, 1)`
            maps of 1 (visible) and 0 (removed): at the input's resolution,
            then at each stage's.
        training: given to drop path in masked mode (the functional graph
            gets it from its caller).

    Returns:
        `(last feature map, {"P2": ..., "P5": ...})`.
    """
    strides, dtype = plan.strides, plan.dtype

    def norm(name):
        return layer(name, lambda: channel_norm(plan.norm_layer, plan.norm_epsilon, dtype, name))

    x = images if visible is None else images * visible[0]
    x = stem_forward(x, plan, layer, norm)
    pyramid_outputs = {}
    block_index = 0
    for stage, (depth, dim) in enumerate(zip(plan.depths, plan.hidden_dims)):
        prefix = f"stages_{stage}"
        if stage > 0:
            x = norm(f"{prefix}_downsample_0")(x)
            if visible is not None:
                # The norm gives removed positions its bias: zero them again.
                x = x * visible[stage]
            x = layer(f"{prefix}_downsample_1", lambda prefix=prefix, dim=dim, stage=stage: (
                Conv2D(
                    dim,
                    kernel_size=2,
                    strides=strides[stage],
                    padding="valid" if strides[stage] == 2 else "same",
                    kernel_initializer=conv_initializer(),
                    dtype=dtype,
                    name=f"{prefix}_downsample_1",
                )
            ))(x)
        for block in range(depth):
            x = block_forward(
                x,
                dim,
                use_grn=plan.use_grn,
                layer_scale_init_value=plan.layer_scale_init_value,
                drop_path_rate=plan.drop_rates[block_index],
                dtype=dtype,
                name=f"{prefix}_blocks_{block}",
                layer=layer,
                visible=None if visible is None else visible[stage + 1],
                training=training,
                norm_layer=plan.norm_layer,
                norm_epsilon=plan.norm_epsilon,
            )
            block_index += 1
        if visible is not None:
            # Removed positions hold no feature (zeros, as the sparse
            # tensor's dense view has).
            x = x * visible[stage + 1]
        pyramid_outputs[f"P{stage + 2}"] = x
    return x, pyramid_outputs


def stem_forward(x, plan, layer, norm):
    """The stem: its convolutions (and activation) by `plan.stem`, then the norm.

    The patchify stem's 4x4 conv has stride `strides[0]` (4 unless lowered
    for small inputs). An overlapping stem's two 3x3 convs pad one pixel on
    every side, as timm's `padding=1` (Keras' "same" would pad only after
    the image at even sizes), and split the stem stride between them: the
    first takes up to 2, the second the rest.
    """
    modules = STEMS[plan.stem]
    stride, dim, dtype = plan.strides[0], plan.hidden_dims[0], plan.dtype
    if plan.stem == "patchify":
        x = layer("stem_0", lambda: Conv2D(
            dim,
            kernel_size=4,
            strides=stride,
            padding="valid" if stride == 4 else "same",
            kernel_initializer=conv_initializer(),
            dtype=dtype,
            name="stem_0",
        ))(x)
        return norm("stem_1")(x)
    conv_strides = [min(stride, 2), max(stride // 2, 1)]
    widths = [stem_width(plan.stem, dim), dim]
    convs = 0
    for index, kind in enumerate(modules):
        name = f"stem_{index}"
        if kind == "norm":
            x = norm(name)(x)
        elif kind == "act":
            x = layer(name, lambda name=name: ExactGelu(dtype=dtype, name=name))(x)
        else:
            x = layer(f"{name}_pad", lambda name=name: layers.ZeroPadding2D(
                1, dtype=dtype, name=f"{name}_pad"))(x)
            x = layer(name, lambda name=name, convs=convs: Conv2D(
                widths[convs],
                kernel_size=3,
                strides=conv_strides[convs],
                padding="valid",
                kernel_initializer=conv_initializer(),
                dtype=dtype,
                name=name,
            ))(x)
            convs += 1
    return x


def block_forward(x, dim, use_grn, layer_scale_init_value, drop_path_rate, dtype, name,
                  layer=_create, visible=None, training=None, norm_layer="layer_norm",
                  norm_epsilon=NORM_EPSILON):
    """One ConvNeXt block (see `network` for `layer`, `visible` and `training`).

    `visible` is one `(batch, h, w, 1)` map at this block's resolution. FCMAE's
    decoder builds its plain V2 block with this function too.
    """
    if visible is not None:
        x = x * visible
    shortcut = x
    x = layer(f"{name}_conv_dw", lambda: DepthwiseConv2D(
        kernel_size=7,
        padding="same",
        depthwise_initializer=conv_initializer(),
        dtype=dtype,
        name=f"{name}_conv_dw",
    ))(x)
    if visible is not None:
        # The bias and the 7x7 window reach removed positions: empty them
        # again, as the sparse convolution, which has no output there.
        x = x * visible
    x = layer(f"{name}_norm", lambda: channel_norm(
        norm_layer, norm_epsilon, dtype, f"{name}_norm"
    ))(x)
    # "gelu" is the exact erf form in Keras, as in the reference network. It
    # is fc1's activation (not a layer of its own) so that TensorFlow fuses
    # MatMul + BiasAdd + GELU into one kernel (see PointwiseDense).
    x = layer(f"{name}_mlp_fc1", lambda: PointwiseDense(
        4 * dim,
        activation="gelu",
        kernel_initializer=conv_initializer(),
        dtype=dtype,
        name=f"{name}_mlp_fc1",
    ))(x)
    if use_grn:
        grn = layer(f"{name}_mlp_grn", lambda: GlobalResponseNorm(
            dtype=dtype, name=f"{name}_mlp_grn"
        ))
        x = grn(x) if visible is None else grn(x, visible=visible)
    x = layer(f"{name}_mlp_fc2", lambda: PointwiseDense(
        dim,
        kernel_initializer=conv_initializer(),
        dtype=dtype,
        name=f"{name}_mlp_fc2",
    ))(x)
    if layer_scale_init_value:
        x = layer(f"{name}_gamma", lambda: LayerScale(
            layer_scale_init_value, dtype=dtype, name=f"{name}_gamma"
        ))(x)
    if drop_path_rate > 0:
        drop_path = layer(f"{name}_drop_path", lambda: DropPath(
            drop_path_rate, dtype=dtype, name=f"{name}_drop_path"
        ))
        x = drop_path(x) if training is None else drop_path(x, training=training)
    return layer(f"{name}_add", lambda: layers.Add(dtype=dtype, name=f"{name}_add"))([shortcut, x])
