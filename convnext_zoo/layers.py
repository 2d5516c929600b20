"""The small custom layers of ConvNeXt: GRN, layer scale and drop path.

Some layers here also carry a backend-specific form of their forward pass
(same variables, same result to float32 rounding): TensorFlow forms that run
in fewer kernels on TensorFlow's CPU graph executor, and JAX forms that
XLA's CPU compiler runs faster than Keras' own: the depthwise convolution as
shifted products (15-30x its grouped convolution), the kernel-is-stride
convolutions as patches times a matrix, and, for a gradient, the MLP's
matmuls on 2-D inputs. `tests/test_layers.py` checks each form against the
Keras layer or formula it stands for; `benchmarks/bench_cpu.py` measures the
whole network, `benchmarks/depthwise_forms.py` the depthwise forms.
"""

import contextlib
import functools
import math
import threading

import keras
from keras import ops

from convnext_zoo import internals
from convnext_zoo.internals import thread_flag


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="convnext_zoo")(cls)


def _tensorflow_graph_kernels():
    """Whether to use TensorFlow's own kernels: TF backend, not under XLA.

    XLA (`jit_compile=True`, e.g. `model.compile(jit_compile=True)`) has no
    kernel for some of them (EuclideanNorm) and fuses element-wise work by
    itself, so the portable `keras.ops` form is used there.
    """
    return keras.config.backend() == "tensorflow" and not internals.in_xla_context()


_FUSED = threading.local()
_EXPORT = threading.local()


@contextlib.contextmanager
def export_forms():
    """Inside: layers take their export form (builtin ops only, portable convolutions).

    The fast CPU forms use two TensorFlow ops that other runtimes lack:
    GRN's norm as `tf.EuclideanNorm` (neither a LiteRT builtin nor a Flex
    op) and the exact GELU as a bare `Erf` (a Flex op in LiteRT, which the
    plain interpreter refuses). Inside this context GRN computes
    `sqrt(sum(square(x)))` and `PointwiseDense` writes the exact GELU as
    `(x * 0.5) * (erf(x / sqrt(2)) + 1)`, the pattern LiteRT's converter
    turns into its builtin `GELU` (exact, `approximate=False`). Same
    variables, same outputs to float32 round-off. `convnext_zoo.export` and
    `model.export` trace inside it; layer norms keep their portable form
    there (the fused oneDNN kernel exists in TensorFlow only), and so does
    the depthwise convolution on JAX (`DepthwiseConv2D`: one convolution op,
    which every exporter maps to its own depthwise kernel).
    """
    with thread_flag(_EXPORT):
        yield


def in_export_forms():
    """True inside `export_forms()`."""
    return getattr(_EXPORT, "active", False)


@contextlib.contextmanager
def fused_layer_norms():
    """Inside: `PointwiseLayerNorm`s traced on TensorFlow's CPU run as one kernel each.

    Used around the traces of `inference_function` and `predict` (see
    `convnext_zoo.inference`), where each float32 layer norm of at least
    `FUSED_MIN_VALUES` values then runs as oneDNN's fused `_MklLayerNorm`
    kernel instead of its seven element-wise and reduction kernels
    (`onednn_layer_norm_available` says where that kernel exists); smaller
    ones are faster without it. Everything else (training, `model.export`,
    OpenVINO's conversion, XLA) keeps the portable TensorFlow form.
    """
    with thread_flag(_FUSED):
        yield


@functools.cache
def onednn_layer_norm_available():
    """Whether this TensorFlow has oneDNN's float32 layer norm kernel on its CPU, and no GPU.

    `_MklLayerNorm` is an internal op of TensorFlow's oneDNN builds (x86);
    TensorFlow's graph rewrite emits it for some layer norm patterns, and
    does not for this library's. With a GPU it would pull the layer norms
    back to the CPU, so it is not used there. The kernel is registered and
    runs where TensorFlow leaves oneDNN's graph rewrites off too
    (`internals.onednn_enabled()` False), so this does not ask it:
    with `TF_ENABLE_ONEDNN_OPTS=0` on an AVX-512 CPU it gave the same
    results and per-call times as with `=1` (benchmarks/layer_norm_sizes.py),
    and tests/test_layers.py's fused layer norm tests passed on an AVX2 CPU.
    """
    if keras.config.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        return False
    return internals.has_cpu_kernel("_MklLayerNorm", tf.float32)


# Below this many values per call, oneDNN's layer norm is slower than the
# short TensorFlow form: it costs 0.12-0.24 ms even for a few hundred values,
# the short form 0.05-0.16 ms up to about 63 thousand values and 1.4-6x the
# fused kernel's time from about 75 thousand up (benchmarks/layer_norm_sizes.py,
# 2 cores).
FUSED_MIN_VALUES = 65536


def _fused_pays(shape):
    """Whether a layer norm of this input shape runs faster as the fused kernel.

    An unknown batch size counts as 1; an unknown other side, as too small.
    """
    values = 1
    for index, side in enumerate(shape):
        if side is None and index > 0:
            return False
        values *= side or 1
    return values >= FUSED_MIN_VALUES


def _in_forward_scope():
    """A name scope that puts a custom gradient's ops under the layer of its forward pass.

    Called in the forward pass; enter the returned scope inside the gradient
    function. TensorFlow names the ops of a written-out gradient from the
    scope it is called in (the top of the training step), so without it a
    profile (`benchmarks/profile_ops.py --train`) could not tell whose they are.
    """
    import tensorflow as tf

    scope = tf.get_current_name_scope()
    return lambda: tf.name_scope(scope + "/gradient/" if scope else "gradient")


def _short_layer_norm(flat, gamma, beta, epsilon):
    """The short TensorFlow form over the last axis of a 2-D `(pixels, channels)` tensor."""
    import tensorflow as tf

    mean = tf.reduce_mean(flat, axis=[-1], keepdims=True)
    centered = flat - mean
    variance = tf.reduce_mean(tf.square(centered), axis=[-1], keepdims=True)
    return centered / tf.sqrt(variance + epsilon) * gamma + beta


def _fused_layer_norm(flat, gamma, beta, epsilon):
    """`_short_layer_norm` computed by one `_MklLayerNorm` kernel.

    Its gradient (the op has none registered) is the short form's, recomputed.
    """
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2

    @tf.custom_gradient
    def norm(x, scale, offset):
        attrs = {
            "T": attr_value_pb2.AttrValue(type=tf.float32.as_datatype_enum),
            "epsilon": attr_value_pb2.AttrValue(f=epsilon),
        }
        outputs = internals.create_graph_op(
            "_MklLayerNorm", [x, scale, offset], [tf.float32], attrs
        )[0]

        scope = _in_forward_scope()

        def grad(upstream):
            with scope():
                with tf.GradientTape() as tape:
                    tape.watch([x, scale, offset])
                    reference = _short_layer_norm(x, scale, offset, epsilon)
                return tape.gradient(reference, [x, scale, offset], output_gradients=upstream)

        return outputs, grad

    return norm(flat, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


def _training_layer_norm(flat, gamma, beta, epsilon):
    """`_short_layer_norm` with its gradient written out (TensorFlow, training).

    The same forward pass with `rsqrt`, and the layer norm's closed-form
    gradient, where TensorFlow's own gradient of the short form makes more
    passes over the feature map (the division by the standard deviation's
    alone, several). A V2 atto or V1 tiny training step at 224 px ran
    1.01-1.05x faster with oneDNN on and level without it
    (benchmarks/tf_step_forms.py, AVX-512 EPYC).
    """
    import tensorflow as tf

    @tf.custom_gradient
    def norm(x, scale, offset):
        centered = x - tf.reduce_mean(x, axis=[-1], keepdims=True)
        inverse_std = tf.math.rsqrt(
            tf.reduce_mean(tf.square(centered), axis=[-1], keepdims=True) + epsilon
        )
        normed = centered * inverse_std

        scope = _in_forward_scope()

        def grad(upstream):
            with scope():
                scaled = upstream * scale
                d_x = inverse_std * (
                    scaled
                    - tf.reduce_mean(scaled, axis=[-1], keepdims=True)
                    - normed * tf.reduce_mean(scaled * normed, axis=[-1], keepdims=True)
                )
                return d_x, tf.reduce_sum(upstream * normed, axis=0), tf.reduce_sum(upstream, axis=0)

        return normed * scale + offset, grad

    return norm(flat, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


@_serializable
class GlobalResponseNorm(keras.layers.Layer):
    """Global Response Normalization (ConvNeXt V2), channels last.

    `Gx = ||x||_2 over H, W`, `Nx = Gx / (mean_c(Gx) + epsilon)`,
    `out = gamma * (x * Nx) + beta + x`. The reduction runs in float32 even
    under a float16 policy: the sum of squares overflows float16. Called
    with `visible` (a `(batch, h, w, 1)` map of 1 and 0), `Gx` counts the
    visible positions of each sample only (FCMAE's masked encoder).

    Args:
        epsilon: added to the channel mean of `Gx` (not inside the sqrt).

    Example:
        >>> layer = GlobalResponseNorm()
        >>> keras.ops.shape(layer(keras.ops.ones((2, 7, 7, 16))))
        (2, 7, 7, 16)
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(
            name="gamma", shape=(channels,), initializer="zeros"
        )
        self.beta = self.add_weight(
            name="beta", shape=(channels,), initializer="zeros"
        )

    def call(self, inputs, visible=None, training=None):
        x = ops.cast(inputs, "float32")
        # Masked (FCMAE's encoder): the norm over each sample's visible
        # positions only, as a sparse GRN over that sample's points.
        counted = x if visible is None else x * ops.cast(visible, "float32")
        # A channel can be exactly zero over the positions counted (float32
        # GELU is 0 below about -5.5; FCMAE's encoder counts 6 positions at
        # 32 px, and uniform images make every position alike): the norm's
        # gradient x / ||x|| is then 0 / 0. Both forms give 0 there, as
        # torch.norm's backward does (a NaN otherwise ends an FCMAE run).
        if _tensorflow_graph_kernels() and not in_export_forms():
            # One reduction kernel instead of Square, Sum and Sqrt. The custom
            # gradient only when training: its IdentityN ops would stay in an
            # inference graph (OpenVINO's conversion then sees extra outputs).
            gx = _euclidean_norm(counted) if training else _euclidean_norm_value(counted)
        else:
            # The floor moves the value by 1e-19 at most.
            gx = ops.sqrt(ops.maximum(ops.sum(ops.square(counted), axis=(1, 2), keepdims=True), _TINY))
        nx = gx / (ops.mean(gx, axis=-1, keepdims=True) + self.epsilon)
        gamma = ops.cast(self.gamma, "float32")
        beta = ops.cast(self.beta, "float32")
        # gamma * (x * nx) + beta + x with the per-channel factors combined
        # first: two passes over the (large) feature map instead of four.
        outputs = x * (gamma * nx + 1.0) + beta
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


_TINY = 1.1754944e-38  # the smallest normal float32


def _euclidean_norm_value(x):
    """`tf.math.reduce_euclidean_norm` over H, W (its gradient is NaN at a zero norm)."""
    import tensorflow as tf

    return tf.math.reduce_euclidean_norm(x, axis=[1, 2], keepdims=True)


def _euclidean_norm(x):
    """`tf.math.reduce_euclidean_norm` over H, W with a zero (not NaN) gradient at a zero norm."""
    import tensorflow as tf

    @tf.custom_gradient
    def norm(x):
        value = _euclidean_norm_value(x)

        scope = _in_forward_scope()

        def grad(upstream):
            with scope():
                # upstream / ||x|| per sample and channel first: one pass over x, not two.
                return x * tf.math.divide_no_nan(upstream, value)

        return value, grad

    return norm(x)


@_serializable
class MaskToken(keras.layers.Layer):
    """Puts a learned vector at removed positions (FCMAE's decoder input).

    `outputs = x * (1 - removed) + token * removed`, with `removed` a
    `(batch, h, w, 1)` map of 1 (removed) and 0 (visible). The token starts
    as normal noise of std 0.02, as in the official FCMAE.

    Example:
        >>> layer = MaskToken()
        >>> keras.ops.shape(layer(keras.ops.ones((1, 2, 2, 4)), keras.ops.zeros((1, 2, 2, 1))))
        (1, 2, 2, 4)
    """

    def build(self, inputs_shape, removed_shape=None):
        self.token = self.add_weight(
            name="mask_token",
            shape=(inputs_shape[-1],),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, inputs, removed):
        removed = ops.cast(removed, self.compute_dtype)
        token = ops.cast(self.token, self.compute_dtype)
        return inputs * (1.0 - removed) + token * removed

    def compute_output_shape(self, inputs_shape, removed_shape=None):
        return inputs_shape


@_serializable
class LayerScale(keras.layers.Layer):
    """Multiplies the channels by a learned vector `gamma` (ConvNeXt V1).

    Args:
        init_value: initial value of every element of `gamma`.

    Example:
        >>> keras.ops.shape(LayerScale(1e-6)(keras.ops.ones((1, 2, 2, 4))))
        (1, 2, 2, 4)
    """

    def __init__(self, init_value=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
        )

    def call(self, inputs):
        return inputs * ops.cast(self.gamma, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@_serializable
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops the whole residual branch per sample.

    Active only when called with `training=True`; surviving samples are
    scaled by `1 / (1 - rate)` so the expectation is unchanged. With
    `rate == 0` it is the identity in every mode.

    Args:
        rate: probability of dropping the branch, in [0, 1).

    Example:
        >>> x = keras.ops.ones((4, 2, 2, 3))
        >>> bool(keras.ops.all(DropPath(0.5)(x, training=False) == x))
        True
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(
                f"DropPath rate must be in [0, 1). Received: rate={rate}."
            )
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        mask = keras.random.uniform(
            shape, seed=self.seed_generator, dtype=self.compute_dtype
        )
        mask = ops.floor(mask + keep)
        return inputs * mask / keep

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


_SQRT_HALF = 0.7071067811865476
_INVERSE_SQRT_2PI = 0.3989422804014327


@_serializable
class PointwiseDense(keras.layers.Dense):
    """A `Dense` on the channels of a feature map that runs as one 2-D matmul.

    Same variables (`kernel` `[in, out]`, `bias` `[out]`) and the same result
    as `keras.layers.Dense`. On the TensorFlow backend (float32) a 4-D
    input is flattened to `(batch*h*w, channels)` and the graph is MatMul ->
    BiasAdd -> GELU on 2-D tensors, with the exact GELU written as
    `x * ((erf(x / sqrt(2)) + 1) * 0.5)`: the pattern TensorFlow's oneDNN
    rewrite fuses into a single matmul kernel (`_MklNativeFusedMatMul`;
    `benchmarks/profile_ops.py` shows it, `tests/test_bench.py` checks it).
    `Dense` on a 4-D input gives a batched matmul, an add and `tf.nn.gelu`'s
    erfc form as separate ops. Other backends use `Dense.call`.

    Example:
        >>> layer = PointwiseDense(8, activation="gelu")
        >>> keras.ops.shape(layer(keras.ops.ones((2, 5, 5, 4))))
        (2, 5, 5, 8)
    """

    def call(self, inputs, training=None):
        if self._flat_on_jax(inputs, training):
            return self._flat_call(inputs)
        if (
            keras.config.backend() != "tensorflow"
            or len(inputs.shape) < 3
            or self.lora_enabled
            or self.quantization_mode is not None
            # float32 only. Under a mixed policy `self.kernel.dtype` reads as the
            # compute dtype (Keras' autocast), and oneDNN's fused 2-D MatMul +
            # BiasAdd in float16 is a slow path: a 40->160 layer on 4,096 rows
            # took 682 ms against 1.2 ms for Dense's own form
            # (benchmarks/mixed_precision_step.py, AVX-512 Xeon, oneDNN on).
            or self.compute_dtype != "float32"
        ):
            return super().call(inputs, training=training)
        import tensorflow as tf

        units = self.kernel.shape[-1]
        flat = tf.reshape(inputs, [-1, inputs.shape[-1]])
        x = tf.matmul(flat, self.kernel)
        if self.bias is not None:
            x = tf.nn.bias_add(x, self.bias)
        if self.activation is keras.activations.gelu and in_export_forms():
            # Exact GELU in the form LiteRT's converter fuses into its builtin GELU.
            x = (x * 0.5) * (tf.math.erf(x * _SQRT_HALF) + 1.0)
        elif self.activation is keras.activations.gelu:
            # Exact GELU in the form oneDNN's rewrite fuses into the matmul.
            x = x * ((tf.math.erf(x * _SQRT_HALF) + 1.0) * 0.5)
        elif self.activation is not None:
            x = self.activation(x)
        return tf.reshape(x, tf.concat([tf.shape(inputs)[:-1], [units]], axis=0))

    def _flat_on_jax(self, inputs, training):
        """Whether this call takes `_flat_call`: training, on JAX's CPU, plain weights, a fixed shape."""
        return (
            bool(training)
            and len(inputs.shape) > 2
            and None not in inputs.shape[1:]
            and not self.lora_enabled
            and self.quantization_mode is None
            and not in_export_forms()
            and _jax_on_cpu()
        )

    def _flat_call(self, inputs):
        """`Dense.call` on the input flattened to `(rows, channels)` (JAX's CPU, training).

        The same matmul, but XLA's CPU compiler runs the gradient of a
        product over three leading axes far slower than over one: an MLP's
        two layers with GELU at V2 atto's first stage, batch 32, took 473 ms
        forward and backward as 4-D products against 196 ms flattened, and a
        whole V2 atto gradient step at 224 px 1.11x faster (with `Conv2D`'s
        patch form 1.17x; `benchmarks/jax_step_forms.py`). Without a
        gradient XLA runs the 4-D form as fast or faster (`--mode forward`,
        AVX-512 EPYC: the flat form 0.89x for V2 atto at batch 1, 0.80x at
        batch 16, 1.01x for V1 tiny at batch 1), so inference keeps `Dense.call`.
        An exact GELU is `_exact_gelu_jax`: the same function, its derivative
        written out.
        """
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        if self.activation is keras.activations.gelu:
            # `Dense.call` with the exact GELU whose derivative is written out.
            flat = ops.matmul(flat, self.kernel)
            if self.bias is not None:
                flat = ops.add(flat, self.bias)
            flat = _exact_gelu_jax()(flat)
        else:
            flat = super().call(flat, training=True)
        return ops.reshape(flat, (-1,) + tuple(inputs.shape[1:-1]) + (self.kernel.shape[-1],))


@functools.cache
def _exact_gelu_jax():
    """The exact GELU, `x * Phi(x)`, with its derivative `Phi(x) + x * phi(x)` written out (JAX).

    `Phi(x) = (1 + erf(x / sqrt(2))) / 2`, as torch computes it. Keras'
    exact GELU on JAX is `jax.nn.gelu`'s `erfc` form, which XLA's CPU
    compiler evaluates with selects between branches (two fusions per layer
    in a profile of V1 tiny's step). Here the gradient keeps only the input
    and recomputes `erf` and one `exp`. V1 tiny's gradient step at batch 32
    ran 1.05x and 1.09x faster than with Keras' GELU, V2 atto's level
    (`benchmarks/jax_step_forms.py`, form `erfc`; AVX-512 EPYC). Used by
    `PointwiseDense._flat_call` (training on JAX's CPU).
    """
    import jax
    from jax import lax

    def cdf(x):
        return 0.5 * (1.0 + lax.erf(x * _SQRT_HALF))

    def plain(x):
        return x * cdf(x)

    def forward(x):
        return plain(x), x

    def backward(x, upstream):
        return (upstream * (cdf(x) + x * (_INVERSE_SQRT_2PI * lax.exp(-0.5 * x * x))),)

    gelu = jax.custom_vjp(plain)
    gelu.defvjp(forward, backward)
    return gelu


@_serializable
class PointwiseLayerNorm(keras.layers.LayerNormalization):
    """`LayerNormalization` over the channels of a feature map.

    Same variables (`gamma`, `beta`) and the same result as
    `keras.layers.LayerNormalization(axis=-1)`, which it is on the JAX and
    PyTorch backends. On TensorFlow (float32, last axis, both `gamma` and
    `beta`, not under XLA) the input is viewed as `(pixels, channels)` and
    normalised as `(x - mean) / sqrt(var + epsilon) * gamma + beta`, with
    `var` the mean of `(x - mean)**2` (the same two-pass variance as Keras).
    That is fewer graph ops than Keras' general formula, which also
    broadcasts `gamma` for any set of axes. It is also the pattern two
    compilers recognise:
    - TensorFlow's graph optimiser turns the division by a square root into
      a multiplication by `rsqrt`;
    - OpenVINO fuses the whole normalisation into one MVN kernel
      (`openvino_function`; it needs the reduction axes as a list, and the
      2-D view).
    Traced inside `fused_layer_norms()` (`inference_function` and `predict`
    do so) on a CPU with oneDNN, a layer norm of at least `FUSED_MIN_VALUES`
    values is instead one `_MklLayerNorm` kernel, with the same result to
    float32 round-off and the portable form's gradient. Called with
    `training=True`, it is `_training_layer_norm`: the same normalisation
    with the layer norm's closed-form gradient.

    Example:
        >>> layer = PointwiseLayerNorm(epsilon=1e-6)
        >>> keras.ops.shape(layer(keras.ops.ones((2, 5, 5, 4))))
        (2, 5, 5, 4)
    """

    def call(self, inputs, training=None):
        rank = len(inputs.shape)
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        if (
            [axis % rank for axis in axes] != [rank - 1]
            or self.rms_scaling
            or self.gamma is None
            or self.beta is None
            or self.compute_dtype != "float32"
            or self.gamma.dtype != "float32"
            or not _tensorflow_graph_kernels()
        ):
            return super().call(inputs)
        import tensorflow as tf

        flat = tf.reshape(inputs, [-1, inputs.shape[-1]])
        if (
            getattr(_FUSED, "active", False)
            and not in_export_forms()
            and not tf.executing_eagerly()
            and _fused_pays(inputs.shape)
            and onednn_layer_norm_available()
        ):
            outputs = _fused_layer_norm(flat, self.gamma, self.beta, self.epsilon)
        elif training and not in_export_forms():
            outputs = _training_layer_norm(flat, self.gamma, self.beta, self.epsilon)
        else:
            outputs = _short_layer_norm(flat, self.gamma, self.beta, self.epsilon)
        return tf.reshape(outputs, tf.shape(inputs))


@_serializable
class ScaleNorm(keras.layers.Layer):
    """A norm over the channels that only rescales: `x / sqrt(v + epsilon) * gamma`.

    No centring of the output and no bias. `statistic` picks `v`:
    "mean_square" is the RMS norm (`mean(x**2)` over the channels; the same
    result as `keras.layers.RMSNormalization`, whose variable is named
    `scale`: here it is `gamma`, the name every norm of this package uses so
    that checkpoint keys map mechanically), "variance" is timm's SimpleNorm
    (the unbiased variance over the channels, as `torch.var`). Reductions
    run in float32 under any dtype policy.

    Args:
        statistic: "mean_square" or "variance".
        epsilon: added to `v` inside the square root.

    Example:
        >>> keras.ops.shape(ScaleNorm("variance")(keras.ops.ones((1, 2, 2, 4)) * [1., 2., 3., 4.]))
        (1, 2, 2, 4)
    """

    STATISTICS = ("mean_square", "variance")

    def __init__(self, statistic="mean_square", epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if statistic not in self.STATISTICS:
            raise ValueError(
                f"Received: statistic={statistic!r}. Valid: {', '.join(self.STATISTICS)}."
            )
        self.statistic = statistic
        self.epsilon = epsilon

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.statistic == "mean_square":
            v = ops.mean(ops.square(x), axis=-1, keepdims=True)
        else:
            channels = x.shape[-1]
            centered = x - ops.mean(x, axis=-1, keepdims=True)
            # Unbiased (n - 1), as timm's SimpleNorm computes it with torch.var.
            v = ops.sum(ops.square(centered), axis=-1, keepdims=True) / (channels - 1)
        outputs = x * ops.rsqrt(v + self.epsilon) * ops.cast(self.gamma, "float32")
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "statistic": self.statistic, "epsilon": self.epsilon}


def channel_norm(norm_layer, epsilon, dtype, name):
    """The norm layer of kind `norm_layer` (see `convnext_zoo.variants.NORM_LAYERS`)."""
    if norm_layer == "layer_norm":
        return PointwiseLayerNorm(epsilon=epsilon, dtype=dtype, name=name)
    statistic = {"rms_norm": "mean_square", "simple_norm": "variance"}[norm_layer]
    return ScaleNorm(statistic, epsilon=epsilon, dtype=dtype, name=name)


@_serializable
class ExactGelu(keras.layers.Layer):
    """The exact (erf) GELU as a layer, with the export form `PointwiseDense` uses.

    Keras' "gelu" activation is exact but on TensorFlow becomes an `Erfc`
    op that LiteRT's plain interpreter refuses; inside `export_forms()` this
    layer writes `(x * 0.5) * (erf(x / sqrt(2)) + 1)`, which LiteRT's
    converter turns into its builtin GELU. Used by the "overlap_act" stem.

    Example:
        >>> keras.ops.shape(ExactGelu()(keras.ops.zeros((1, 2))))
        (1, 2)
    """

    def call(self, inputs):
        if keras.config.backend() == "tensorflow" and in_export_forms():
            import tensorflow as tf

            return (inputs * 0.5) * (tf.math.erf(inputs * _SQRT_HALF) + 1.0)
        return keras.activations.gelu(inputs, approximate=False)

    def compute_output_shape(self, input_shape):
        return input_shape


# The most taps (kernel height x width) that the shifted form unrolls. Up to
# 11x11 it ran 15-30x faster than XLA's grouped convolution on a 2-core CPU;
# at 15x15 and above XLA no longer keeps the sum in one loop and the shifted
# form lost at batch 1, and compiled for seconds (benchmarks/depthwise_forms.py
# --kernel-sizes).
SHIFTED_MAX_TAPS = 121


def _jax_on_cpu():
    """Whether the JAX backend is in use and its default device is a CPU."""
    if keras.config.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def shifted_depthwise_conv(inputs, kernel, padding="same"):
    """A stride-1 channels-last depthwise convolution as a sum of shifted products.

    `out[n, y, x, c] = sum_ij pad(inputs)[n, y + i, x + j, c] * kernel[i, j, c, 0]`:
    the same sum as `keras.ops.depthwise_conv` with strides and dilation 1
    and depth multiplier 1, computed in float32 whatever the input dtype
    (the result is float32). "same" pads like TensorFlow and Keras: for an
    even kernel side the extra row or column goes after. Written with
    `keras.ops` so that tests can hold it against the convolution on any
    backend; `DepthwiseConv2D` uses it on JAX's CPU only, where XLA fuses the
    whole sum into one loop over the output.

    Args:
        inputs: `(batch, height, width, channels)`.
        kernel: `(kernel_height, kernel_width, channels, 1)`, Keras' layout.
        padding: "same" or "valid".

    Returns:
        `(batch, out_height, out_width, channels)`, float32.

    Example:
        >>> x = keras.ops.ones((1, 5, 5, 2))
        >>> keras.ops.shape(shifted_depthwise_conv(x, keras.ops.ones((3, 3, 2, 1))))
        (1, 5, 5, 2)
    """
    if padding not in ("same", "valid"):
        raise ValueError(
            f"shifted_depthwise_conv pads 'same' or 'valid'. Received: padding={padding!r}."
        )
    x = ops.cast(inputs, "float32")
    kernel = ops.cast(kernel, "float32")
    rows, columns = _paddings(kernel.shape, padding)
    return _shifted_sum(ops.pad(x, [[0, 0], rows, columns, [0, 0]]), kernel[:, :, :, 0], x.shape[1:3], padding)


def _paddings(kernel_shape, padding):
    """`([top, bottom], [left, right])` of the convolution: Keras' "same" puts the odd one after."""
    if padding == "valid":
        return [0, 0], [0, 0]
    return [[(side - 1) // 2, side - 1 - (side - 1) // 2] for side in kernel_shape[:2]]


def _shifted_sum(padded, kernel, size, padding):
    """`sum_ij padded[:, i:i + h, j:j + w, :] * kernel[i, j]`, `(h, w)` the output size."""
    kernel_height, kernel_width = kernel.shape[0], kernel.shape[1]
    height, width = size
    if padding == "valid":
        height, width = height - kernel_height + 1, width - kernel_width + 1
    outputs = None
    for i in range(kernel_height):
        for j in range(kernel_width):
            term = padded[:, i:i + height, j:j + width, :] * kernel[i, j]
            outputs = term if outputs is None else outputs + term
    return outputs


def _shifted_depthwise_conv_jax(inputs, kernel, padding, write_once=True):
    """`shifted_depthwise_conv` with its gradient written out (JAX only).

    JAX's own derivative of the sum is 49 pads of the upstream gradient
    added up, which XLA compiled 4x slower than the convolution's gradient
    for a whole model (20 s against 5 s for a small V2 at 224 px). Written
    out, the input gradient is the same kind of shifted sum (the flipped
    kernel over the upstream gradient, padded on the opposite sides) and
    the kernel gradient a sum over the batch and pixels per tap
    (`_depthwise_kernel_gradient`).

    With `write_once` (what the layer does), the sum runs as one branch of
    a `lax.cond` whose other branch is XLA's own convolution of the same
    operands, taken only for a kernel holding an infinity or NaN (where
    both give the same infinities and NaNs). The conditional is there for
    XLA's fusion, not for the choice: XLA does not fuse across it, so the
    sum is computed once, written, and read by the layers after it.
    Without it, XLA's CPU compiler copied the 49 products into the fusions
    of the following layer norm and computed them two or three times. On a
    2-core Xeon the conditional made a 224 px gradient step at batch 32
    1.20x (V2 atto) and 1.24x (V1 tiny) faster, and an inference pass
    1.06-1.11x at batch 1 and 16 (`benchmarks/jax_step_forms.py`, form
    `recompute`). XLA's CPU pipeline drops `lax.optimization_barrier`
    before fusion, so that cannot do it. Being inside the custom gradient,
    the conditional is never differentiated: training keeps the same
    residuals.
    """
    import jax
    import jax.numpy as jnp

    rows, columns = _paddings(kernel.shape, padding)
    size = tuple(inputs.shape[1:3])
    padding_pairs = [tuple(rows), tuple(columns)]

    def shifted(x, taps):
        return _shifted_sum(ops.pad(x, [[0, 0], rows, columns, [0, 0]]), taps, size, padding)

    def grouped(x, taps):
        return jax.lax.conv_general_dilated(
            x, taps[:, :, None, :], (1, 1), padding_pairs,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        )

    @jax.custom_vjp
    def conv(x, taps):
        if not write_once:
            return shifted(x, taps)
        return jax.lax.cond(jnp.all(jnp.isfinite(taps)), shifted, grouped, x, taps)

    def forward(x, taps):
        return conv(x, taps), (x, taps)

    def backward(saved, upstream):
        x, taps = saved
        kernel_height, kernel_width = taps.shape[0], taps.shape[1]
        opposite = [[0, 0], [kernel_height - 1 - rows[0], kernel_height - 1 - rows[1]],
                    [kernel_width - 1 - columns[0], kernel_width - 1 - columns[1]], [0, 0]]
        d_x = _shifted_sum(ops.pad(upstream, opposite), taps[::-1, ::-1], size, "same")
        padded = ops.pad(x, [[0, 0], rows, columns, [0, 0]])
        return d_x, _depthwise_kernel_gradient(padded, upstream, kernel_height, kernel_width)

    conv.defvjp(forward, backward)
    return conv(ops.cast(inputs, "float32"), ops.cast(kernel, "float32")[:, :, :, 0])


# When the depthwise kernel's gradient is taken as Gram matrices rather than
# tap by tap: for an upstream gradient of at least DEPTHWISE_GRAM_MIN_VALUES
# values (6 MiB of float32; below that the taps' 49 passes stay in the CPU's
# cache), whose rows x batch (the length of each Gram matrix's sums) are at
# least DEPTHWISE_GRAM_MIN_SUMMED, and whose width is between twice the
# kernel's and DEPTHWISE_GRAM_MAX_WIDTH (the Gram matrices do (w + kw - 1) /
# kw times the taps' work). Read off one table, a 2-core AMD EPYC with 32 MiB
# of L3 and AVX-512, batch 2-32 at 224-768 px: there the rule picks the faster
# form in 62 of 64 shapes and is at most 1.23x slower where it misses (taps /
# gram 1.07-1.79x where it takes the Gram form; V2 atto's first stage at batch
# 32: 1.77x); in a second run, 55 of 64, the misses mostly near the bounds.
# `python benchmarks/depthwise_forms.py --parts kernel_grad`; benchmarks/README.md,
# "The depthwise kernel's gradient on JAX".
DEPTHWISE_GRAM_MIN_VALUES = 6 * 2**20 // 4
DEPTHWISE_GRAM_MIN_SUMMED = 384
DEPTHWISE_GRAM_MAX_WIDTH = 128


def _depthwise_kernel_gradient(padded, upstream, kernel_height, kernel_width):
    """`d[i, j, c] = sum_nyx padded[n, y + i, x + j, c] * upstream[n, y, x, c]` (JAX only).

    The gradient of a stride-1 depthwise convolution's kernel: `padded` is its
    padded input `(n, h + kh - 1, w + kw - 1, c)`, `upstream` the gradient of
    its output `(n, h, w, c)`; returns `(kh, kw, c)`, float32, in the form
    `_kernel_gradient_form` picks for the shape.
    """
    form = _kernel_gradient_form(upstream.shape, kernel_width)
    return form(padded, upstream, kernel_height, kernel_width)


def _kernel_gradient_form(upstream_shape, kernel_width):
    """`_kernel_gradient_by_gram` for large feature maps of moderate width (the bounds above), else
    `_kernel_gradient_by_taps`: the same sums, to float32 round-off."""
    batch, height, width = upstream_shape[:3]
    if (math.prod(upstream_shape) >= DEPTHWISE_GRAM_MIN_VALUES
            and height * batch >= DEPTHWISE_GRAM_MIN_SUMMED
            and 2 * kernel_width <= width <= DEPTHWISE_GRAM_MAX_WIDTH):
        return _kernel_gradient_by_gram
    return _kernel_gradient_by_taps


def _kernel_gradient_by_taps(padded, upstream, kernel_height, kernel_width):
    """One reduction per tap, in one loop over the taps (49 reductions per layer written out took XLA
    minutes to compile for a whole model). Each tap reads its window of `padded` and all of `upstream`
    again: fast while both stay in the CPU's cache, 49 passes over memory once they do not."""
    import jax
    import jax.numpy as jnp

    def tap_gradient(tap):
        start = (0, tap // kernel_width, tap % kernel_width, 0)
        window = jax.lax.dynamic_slice(padded, start, upstream.shape)
        return jnp.sum(window * upstream, axis=(0, 1, 2))

    taps = jax.lax.map(tap_gradient, jnp.arange(kernel_height * kernel_width))
    return jnp.reshape(taps, (kernel_height, kernel_width, upstream.shape[-1]))


def _kernel_gradient_by_gram(padded, upstream, kernel_height, kernel_width):
    """The same sums as one batched matmul per kernel row, on channels-first copies.

    For kernel row `i`, the input's rows `i .. i + h` (a contiguous slice when
    rows come before the batch) against the upstream gradient, contracted over
    rows and batch, give per channel the Gram matrix `g[p, x]` of every padded
    input column `p` with every output column `x`; tap `(i, j)` is the sum of
    its `j`-th diagonal, `g[x + j, x]`. That multiplies (w + kw - 1) / kw times
    more than the taps need, but each pass is a matmul that reads its operands
    once, where the taps read both 49 times.
    """
    import jax
    import jax.numpy as jnp

    batch, height, width, channels = upstream.shape
    padded = jnp.transpose(padded, (3, 1, 0, 2))  # (c, h + kh - 1, n, w + kw - 1)
    upstream = jnp.reshape(jnp.transpose(upstream, (3, 1, 0, 2)), (channels, height * batch, width))

    def row_gradient(i):
        rows = jax.lax.dynamic_slice_in_dim(padded, i, height, axis=1)
        gram = jnp.einsum("cnp,cnx->cpx", jnp.reshape(rows, (channels, height * batch, -1)), upstream)
        return jnp.stack([jnp.trace(gram, offset=-j, axis1=1, axis2=2) for j in range(kernel_width)])

    return jax.lax.map(row_gradient, jnp.arange(kernel_height))


@_serializable
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that runs as patches times a matrix on JAX's CPU.

    A convolution whose kernel is as large as its stride, with "valid"
    padding (the patchify stem's 4x4 / 4 and the 2x2 / 2 downsampling) sees
    each input pixel once: it is the input cut into `kh x kw` patches, each
    flattened in the kernel's `(kh, kw, in)` order, times the kernel read as
    a `(kh * kw * in, filters)` matrix. XLA's CPU compiler runs that
    reshape and matmul 2-3x faster than its convolution, forward and
    backward (`python benchmarks/depthwise_forms.py --parts patch`). So on
    the JAX backend with a CPU as default device, for such a layer
    (dilation 1, one group, channels last, static height and width), the
    layer computes the product; everywhere else (TensorFlow, PyTorch, JAX
    on an accelerator, inside `export_forms()`, other settings) it is the
    Keras layer. Same variables, config and result to float32 round-off
    (tests/test_layers.py holds outputs and gradients to the convolution's).
    It keeps Keras' class name, as `DepthwiseConv2D` does: Keras files its
    variables in `.weights.h5` (keras-hub presets) under the layer class's
    name, so presets written with `keras.layers.Conv2D` load unchanged.

    Example:
        >>> layer = Conv2D(8, kernel_size=4, strides=4)
        >>> keras.ops.shape(layer(keras.ops.ones((2, 16, 16, 3))))
        (2, 4, 4, 8)
    """

    def call(self, inputs):
        if not self._patch_form(inputs):
            return super().call(inputs)
        kernel_height, kernel_width = self.kernel_size
        channels = inputs.shape[-1]
        rows, columns = inputs.shape[1] // kernel_height, inputs.shape[2] // kernel_width
        # "valid" drops the rows and columns that do not fill a patch.
        x = inputs[:, :rows * kernel_height, :columns * kernel_width, :]
        x = ops.reshape(x, (-1, rows, kernel_height, columns, kernel_width, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        x = ops.reshape(x, (-1, kernel_height * kernel_width * channels))
        outputs = ops.matmul(x, ops.reshape(self.kernel, (-1, self.filters)))
        if self.use_bias:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return ops.reshape(outputs, (-1, rows, columns, self.filters))

    def _patch_form(self, inputs):
        return (
            tuple(self.strides) == tuple(self.kernel_size)
            and self.padding == "valid"
            and self.dilation_rate == (1, 1)
            and self.groups == 1
            and self.data_format == "channels_last"
            and inputs.shape[1] is not None
            and inputs.shape[2] is not None
            and not in_export_forms()
            and _jax_on_cpu()
        )


@_serializable
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` that runs as shifted products on JAX's CPU.

    Same variables (`kernel` `[kh, kw, channels, 1]`, `bias`), config and
    result as the Keras layer, which it is on TensorFlow, PyTorch, JAX on
    an accelerator, inside `export_forms()` and for any setting below other
    than the ones ConvNeXt uses. XLA's CPU compiler runs a depthwise
    convolution as a grouped convolution, slowly: a 7x7 one at ConvNeXt-T's
    block shapes took 15-30x the time of the same sum written as 49
    products of shifted slices (`shifted_depthwise_conv`), which XLA fuses
    into one loop (benchmarks/depthwise_forms.py). So on the JAX backend
    with a CPU as default device, for stride 1, dilation 1, depth
    multiplier 1, channels last, "same" or "valid" padding and at most
    `SHIFTED_MAX_TAPS` kernel taps, the layer computes that sum (in float32,
    cast back to the compute dtype). Training goes through the same form:
    JAX differentiates it (the gradients equal the convolution's to float32
    round-off; tests/test_layers.py checks both).

    Example:
        >>> layer = DepthwiseConv2D(kernel_size=7, padding="same")
        >>> keras.ops.shape(layer(keras.ops.ones((2, 9, 9, 4))))
        (2, 9, 9, 4)
    """

    def call(self, inputs):
        if not self._shifted_form():
            return super().call(inputs)
        outputs = _shifted_depthwise_conv_jax(inputs, self.kernel, self.padding)
        if self.bias is not None:
            outputs = outputs + ops.cast(self.bias, "float32")
        outputs = ops.cast(outputs, self.compute_dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _shifted_form(self):
        kernel_height, kernel_width = self.kernel_size
        return (
            self.strides == (1, 1)
            and self.dilation_rate == (1, 1)
            and self.depth_multiplier == 1
            and self.data_format == "channels_last"
            and self.padding in ("same", "valid")
            and kernel_height * kernel_width <= SHIFTED_MAX_TAPS
            and not in_export_forms()
            and _jax_on_cpu()
        )
