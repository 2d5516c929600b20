"""`ConvNeXtBackbone`: the ConvNeXt V1/V2 feature extractor as a keras-hub backbone."""

import contextlib
import threading

import keras
import numpy as np
from keras import layers
from keras_hub.models import FeaturePyramidBackbone

from convnext_zoo.inference import SingleBatchPredict
from convnext_zoo.layers import (
    DropPath,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    PointwiseLayerNorm,
    thread_flag,
)
from convnext_zoo.variants import MIN_INPUT_SIZE, plan_strides

LAYER_NORM_EPSILON = 1e-6


_LOADING = threading.local()


@contextlib.contextmanager
def weights_to_be_loaded():
    """Skips the init of the backbone's variables: their values come next.

    For code that writes every backbone weight right after building (loading
    a preset or converting a checkpoint). A `ConvNeXtBackbone` built inside
    the context creates its variables *pending* (so does the head of a
    `ConvNeXtImageClassifier`): shape and dtype only, no backend tensor.
    `load_value` then creates each one from its loaded value, so a load
    makes one backend tensor per variable instead of an initialised one and
    a copy into it (`benchmarks/bench_cpu.py --cold-start-only` measures the
    load). A variable the load does not write (a head being replaced) gets
    its own initializer at the end, so a fresh head is random as usual.

    The loader must end with `initialize_pending` on the model's variables
    (`weights.assign_strict` does), so that no pending variable escapes.
    Where this Keras cannot defer variables (`can_defer_variables()` is
    False), the backbone is built eagerly with `conv_initializer` filling
    zeros instead of drawing truncated normals.
    """
    with thread_flag(_LOADING):
        yield


def can_defer_variables():
    """Whether this Keras has the deferred-variable hooks `load_value` uses.

    They are Keras internals (the pending state of a variable created in a
    `keras.StatelessScope`), so they are checked rather than assumed. Not on
    the PyTorch backend: its layers register every variable as a torch
    Parameter as soon as they are built, which needs the value.
    """
    from keras.src.backend.common import global_state, stateless_scope

    return (
        keras.config.backend() != "torch"
        and hasattr(keras.Variable, "_deferred_initialize")
        and hasattr(stateless_scope, "in_stateless_scope")
        and hasattr(global_state, "get_global_attribute")
    )


def is_pending(variable):
    """True for a variable built inside `weights_to_be_loaded` and not yet set."""
    return getattr(variable, "_value", True) is None and getattr(
        variable, "_initializer", None
    ) is not None


def load_value(variable, value):
    """Sets `variable` to the array `value` (same shape; cast to its dtype).

    A pending variable is created from `value` directly; any other is
    assigned. The value is first put in C order and the variable's dtype by
    `backend_value`.
    """
    value = backend_value(np.asarray(value), variable.dtype)
    if not is_pending(variable):
        variable.assign(value)
        return
    variable._initializer = lambda shape, dtype=None: value
    variable._deferred_initialize()


def backend_value(array, dtype):
    """`array` cast to `dtype` in C order, ready to become a variable.

    On TensorFlow it is copied once into fresh memory aligned to 64 bytes
    and handed over through DLPack, so the variable keeps that buffer.
    Given a NumPy array instead, TensorFlow copies it twice (a NumPy copy,
    then an aligned one), and every copy into fresh memory pays its page
    faults (`bench_cpu.py --cold-start-only` measures the load). DLPack
    carries no bfloat16, so a bfloat16 value goes in as a NumPy array.
    Other backends get `c_contiguous` (at most one copy; they copy again
    into their own buffers).
    """
    if keras.config.backend() != "tensorflow":
        return c_contiguous(array, dtype)
    import tensorflow as tf

    owned = c_contiguous(array, dtype, out=aligned_empty(array.shape, dtype))
    try:
        return tf.experimental.dlpack.from_dlpack(owned.__dlpack__())
    except BufferError:  # a dtype DLPack cannot describe (bfloat16)
        return owned


_TILE = 256
# Bytes. TensorFlow's CPU allocator aligns every buffer so, and its kernels
# rely on it: a misaligned DLPack tensor aborts the process in tf.transpose
# ("Check failed: IsAligned()").
_ALIGN = 64


def aligned_empty(shape, dtype):
    """An uninitialised C-order array whose data starts on a 64-byte boundary.

    (An array of no elements has no data to align.)
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def c_contiguous(array, dtype=None, out=None):
    """`array` in C order and cast to `dtype`, in at most one copy.

    Checkpoints in PyTorch's layout store each Linear weight as
    `[out, in]`, and Keras wants `[in, out]`: the loader hands over the
    transposed view. Copying it in one go (NumPy's `ascontiguousarray`, or
    the backend converting the view) walks the source by columns and misses
    the cache on nearly every element; copying square tiles keeps both
    sides of each tile in cache, and each tile is cast as it is copied (a
    float16 checkpoint into float32 variables is not first cast in the
    transposed order, then copied again). Anything else goes through one
    `np.asarray(..., order="C")` (no copy when already in C order and of
    `dtype`).

    Args:
        out: optional C-order array of the shape and dtype to copy into;
            then there is always exactly one copy, into `out`.
    """
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    transposed = array.ndim == 2 and not array.flags.c_contiguous and array.T.flags.c_contiguous
    if out is None:
        if not transposed:
            return np.asarray(array, dtype=dtype, order="C")
        out = np.empty(array.shape, dtype)
    elif out.shape != array.shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"`out` must be a C-order array of shape {array.shape} and dtype "
            f"{dtype}. Received: shape {out.shape}, dtype {out.dtype}, "
            f"C order: {out.flags.c_contiguous}."
        )
    if not transposed:
        np.copyto(out, array, casting="unsafe")
        return out
    rows, cols = array.shape
    for row in range(0, rows, _TILE):
        for col in range(0, cols, _TILE):
            out[row : row + _TILE, col : col + _TILE] = array[row : row + _TILE, col : col + _TILE]
    return out


def initialize_pending(variables):
    """Initialises, with their own initializers, the variables still pending."""
    for variable in variables:
        if is_pending(variable):
            variable._deferred_initialize()


@contextlib.contextmanager
def deferred_while_loading():
    """Inside `weights_to_be_loaded`: layers built here get pending variables.

    Used around the layer graphs of the backbone and the classifier head.
    The pending variables are kept out of Keras' global list of variables
    to initialise. Outside `weights_to_be_loaded` it does nothing.
    """
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    # Inside a caller's own StatelessScope Keras already defers, and its
    # scope must keep initialising what it deferred: leave it alone.
    enabled = getattr(_LOADING, "active", False)
    if not enabled or in_stateless_scope() or not can_defer_variables():
        yield
        return
    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key, []) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        # The pending variables belong to the model being loaded only: a
        # later StatelessScope exit must not initialise them behind the loader.
        global_state.set_global_attribute(key, before)


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvInitializer(keras.initializers.TruncatedNormal):
    """Truncated normal (`TruncatedNormal` config), zeros inside `weights_to_be_loaded`."""

    def __call__(self, shape, dtype=None):
        if getattr(_LOADING, "active", False):
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
class ConvNeXtBackbone(SingleBatchPredict, FeaturePyramidBackbone):
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
        """The backbone of a preset: registered name, alias, `hf://` or directory.

        Uses convnext_zoo's registry and loaders (`convnext_zoo.from_preset`
        with `include_top=False`), not keras-hub's built-in presets.

        Example:
            >>> backbone = ConvNeXtBackbone.from_preset("convnext_v2_atto")
        """
        from convnext_zoo.hub import backbone_from_preset

        return backbone_from_preset(preset, load_weights=load_weights, **kwargs)

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
    x = layers.DepthwiseConv2D(
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
