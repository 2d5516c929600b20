"""`ConvNeXtBackbone`: the ConvNeXt V1/V2 feature extractor as a keras-hub backbone."""

import keras
from keras import layers
from keras_hub.models import FeaturePyramidBackbone

from convnext_zoo import pipeline
from convnext_zoo.inference import PortableExport, SingleBatchPredict
from convnext_zoo.internals import deferred_while_loading, loading_weights
from convnext_zoo.layers import (
    DepthwiseConv2D,
    DropPath,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    PointwiseLayerNorm,
)
from convnext_zoo.variants import MIN_INPUT_SIZE, plan_strides

LAYER_NORM_EPSILON = 1e-6


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvInitializer(keras.initializers.TruncatedNormal):
    """Truncated normal (`TruncatedNormal` config), zeros while weights are being loaded.

    Only where Keras cannot defer variables (see
    `convnext_zoo.internals.weights_to_be_loaded`): drawing random numbers
    that the loader overwrites next would be wasted work.
    """

    def __call__(self, shape, dtype=None):
        if loading_weights():
            return keras.ops.zeros(shape, dtype=dtype)
        return super().__call__(shape, dtype=dtype)


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

    Stem (4x4 conv, LayerNorm), then four stages of ConvNeXt blocks with a
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
        dtype: dtype policy of every layer (e.g. "mixed_float16").

    Example:
        >>> backbone = ConvNeXtBackbone(
        ...     depths=(1, 1, 1, 1), hidden_dims=(8, 16, 24, 32), use_grn=True,
        ...     layer_scale_init_value=None, image_shape=(64, 64, 3))
        >>> backbone.output.shape
        (None, 2, 2, 32)
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
        dtype=None,
        **kwargs,
    ):
        depths = [int(d) for d in depths]
        hidden_dims = [int(d) for d in hidden_dims]
        image_shape = tuple(None if s is None else int(s) for s in image_shape)
        _validate(depths, hidden_dims, drop_path_rate, image_shape)
        strides = plan_strides(image_shape[0], image_shape[1], adapt_small_inputs)
        total_blocks = sum(depths)
        drop_rates = [
            drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)
        ]

        # === Functional model ===
        with deferred_while_loading():
            inputs, x, pyramid_outputs = _layers(
                depths, hidden_dims, use_grn, layer_scale_init_value,
                drop_rates, image_shape, strides, dtype,
            )
        super().__init__(inputs=inputs, outputs=x, dtype=dtype, **kwargs)

        # === Config ===
        self.depths = depths
        self.hidden_dims = hidden_dims
        self.use_grn = use_grn
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.image_shape = image_shape
        self.adapt_small_inputs = adapt_small_inputs
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
            >>> backbone = ConvNeXtBackbone.from_preset("convnext_v2_atto")
        """
        kwargs.setdefault("preprocessing", False)
        return pipeline.load(
            preset, cls, None, include_top=False, pooling=None, load_weights=load_weights, **kwargs
        )

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
            }
        )
        return config


def _layers(depths, hidden_dims, use_grn, layer_scale_init_value, drop_rates,
            image_shape, strides, dtype):
    """The layer graph: `(inputs, last feature map, pyramid outputs)`."""
    inputs = keras.Input(shape=image_shape, name="images")
    x = layers.Conv2D(
        hidden_dims[0],
        kernel_size=4,
        strides=strides[0],
        padding="valid" if strides[0] == 4 else "same",
        kernel_initializer=conv_initializer(),
        dtype=dtype,
        name="stem_0",
    )(inputs)
    x = PointwiseLayerNorm(
        epsilon=LAYER_NORM_EPSILON, dtype=dtype, name="stem_1"
    )(x)
    pyramid_outputs = {}
    block_index = 0
    for stage, (depth, dim) in enumerate(zip(depths, hidden_dims)):
        prefix = f"stages_{stage}"
        if stage > 0:
            x = PointwiseLayerNorm(
                epsilon=LAYER_NORM_EPSILON,
                dtype=dtype,
                name=f"{prefix}_downsample_0",
            )(x)
            x = layers.Conv2D(
                dim,
                kernel_size=2,
                strides=strides[stage],
                padding="valid" if strides[stage] == 2 else "same",
                kernel_initializer=conv_initializer(),
                dtype=dtype,
                name=f"{prefix}_downsample_1",
            )(x)
        for block in range(depth):
            x = _block(
                x,
                dim,
                use_grn=use_grn,
                layer_scale_init_value=layer_scale_init_value,
                drop_path_rate=drop_rates[block_index],
                dtype=dtype,
                name=f"{prefix}_blocks_{block}",
            )
            block_index += 1
        pyramid_outputs[f"P{stage + 2}"] = x
    return inputs, x, pyramid_outputs


def _block(x, dim, use_grn, layer_scale_init_value, drop_path_rate, dtype, name):
    shortcut = x
    x = DepthwiseConv2D(
        kernel_size=7,
        padding="same",
        depthwise_initializer=conv_initializer(),
        dtype=dtype,
        name=f"{name}_conv_dw",
    )(x)
    x = PointwiseLayerNorm(
        epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=f"{name}_norm"
    )(x)
    # "gelu" is the exact erf form in Keras, as in the reference network. It
    # is fc1's activation (not a layer of its own) so that TensorFlow fuses
    # MatMul + BiasAdd + GELU into one kernel (see PointwiseDense).
    x = PointwiseDense(
        4 * dim,
        activation="gelu",
        kernel_initializer=conv_initializer(),
        dtype=dtype,
        name=f"{name}_mlp_fc1",
    )(x)
    if use_grn:
        x = GlobalResponseNorm(dtype=dtype, name=f"{name}_mlp_grn")(x)
    x = PointwiseDense(
        dim,
        kernel_initializer=conv_initializer(),
        dtype=dtype,
        name=f"{name}_mlp_fc2",
    )(x)
    if layer_scale_init_value:
        x = LayerScale(layer_scale_init_value, dtype=dtype, name=f"{name}_gamma")(x)
    if drop_path_rate > 0:
        x = DropPath(drop_path_rate, dtype=dtype, name=f"{name}_drop_path")(x)
    return layers.Add(dtype=dtype, name=f"{name}_add")([shortcut, x])
