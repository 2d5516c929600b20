"""Every use of a private Keras, keras-hub or TensorFlow API, in one place.

The rest of the package calls the small functions here and never imports
`keras.src`, `keras_hub.src` or `tensorflow.python`, nor touches a
leading-underscore attribute of another library. Each hook is guarded: where
a release has taken it away, the function falls back to the portable path
(built with random init then overwritten, the portable layer form, a plain
keras-hub base class). `tests/test_internals.py` checks every hook is still
there, so a release that removes one fails the suite loudly instead of
making the library silently slower.

Five groups:

* deferred variables for loading (`weights_to_be_loaded`, `load_value`):
  a model built to receive a checkpoint creates its variables from the
  loaded values instead of initialising them and copying over them;
* TensorFlow graph details used by the fast layer forms (`in_xla_context`,
  `has_cpu_kernel`, `create_graph_op`);
* the metadata checks `torch.export` writes into a graph (`torch_export_checks`);
* keras-hub's preprocessing base pieces (`PreprocessingLayer`,
  `preprocessing_function`);
* export: Keras' tf2onnx fixes, the LiteRT converter's buffer-offset mode.
"""

import contextlib
import threading

import keras
import numpy as np

# === Which hooks this installation has ===


def _keras_state_modules():
    """Keras' global-state and stateless-scope modules, or `None` if moved."""
    try:
        from keras.src.backend.common import global_state, stateless_scope
    except ImportError:
        return None
    if not (
        hasattr(stateless_scope, "in_stateless_scope")
        and hasattr(global_state, "get_global_attribute")
        and hasattr(global_state, "set_global_attribute")
    ):
        return None
    return global_state, stateless_scope


def missing_hooks():
    """Names of the private hooks this installation lacks (empty when all are there).

    Each missing hook costs speed, never correctness: the portable path is
    taken instead (or, for LiteRT files over 2 GB, a clear refusal). The test suite asserts this list is empty.
    """
    missing = []
    if _keras_state_modules() is None:
        missing.append("keras.src.backend.common global_state / stateless_scope")
    for attribute in ("_deferred_initialize", "_initializer", "_value"):
        if not _variable_has(attribute):
            missing.append(f"keras.Variable.{attribute}")
    if _preprocessing_pieces() is None:
        missing.append("keras_hub.src PreprocessingLayer / preprocessing_function")
    # Protected methods of Keras' optimizer that `training.LayerDecayAdamW`
    # overrides or calls (per-variable learning rate and weight decay).
    for method in ("_use_weight_decay", "_get_variable_index", "_apply_weight_decay"):
        if not hasattr(keras.optimizers.AdamW, method):
            missing.append(f"keras.optimizers.AdamW.{method}")
    if keras.config.backend() == "tensorflow":
        if _tf_control_flow_util() is None:
            missing.append("tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext")
        if _tf_kernel_registry() is None:
            missing.append("tensorflow.python.framework kernels / op_def_registry")
        if _tf_is_mkl_enabled() is None:
            missing.append("tensorflow.python.util._pywrap_util_port.IsMklEnabled")
        import tensorflow as tf

        if not hasattr(tf.Graph, "_create_op_internal"):
            missing.append("tf.Graph._create_op_internal")
    if _keras_tf2onnx_patch() is None:
        missing.append("keras.src.export.tf2onnx_lib.patch_tf2onnx")
    if _litert_converter_has_buffer_offsets() is False:
        missing.append(f"tf.lite.TFLiteConverter.{_LITERT_BUFFER_OFFSET}")
    if keras.config.backend() == "torch" and not torch_export_checks():
        missing.append("torch.ops.aten._assert_tensor_metadata")
    return missing


def _variable_has(attribute):
    if attribute == "_deferred_initialize":
        return hasattr(keras.Variable, attribute)
    # Instance attributes: look at a throwaway variable.
    probe = keras.Variable(np.zeros((1,), "float32"), trainable=False, name="probe")
    return hasattr(probe, attribute)


# === Deferred variables for loading ===

_LOADING = threading.local()


@contextlib.contextmanager
def thread_flag(flag):
    """Sets `flag.active` (a `threading.local`) inside the block; nested blocks restore it."""
    previous = getattr(flag, "active", False)
    flag.active = True
    try:
        yield
    finally:
        flag.active = previous


@contextlib.contextmanager
def weights_to_be_loaded():
    """Skips the init of the model's variables: their values come next.

    For code that writes every backbone weight right after building (the
    loading pipeline). A `ConvNeXtBackbone` built inside the context creates
    its variables *pending* (so does the head of a `ConvNeXtImageClassifier`):
    shape and dtype only, no backend tensor. `load_value` then creates each
    one from its loaded value, so a load makes one backend tensor per
    variable instead of an initialised one and a copy into it
    (`benchmarks/bench_cpu.py --cold-start-only` measures the load). A
    variable the load does not write (a head being replaced) gets its own
    initializer at the end, so a fresh head is random as usual.

    The loader must end with `initialize_pending` on the model's variables
    (`weights.assign_strict` does), so that no pending variable escapes.
    Where this Keras cannot defer variables (`can_defer_variables()` is
    False), the model is built eagerly and `loading_weights()` tells the
    architecture's initializers to fill zeros instead of drawing random
    numbers.
    """
    with thread_flag(_LOADING):
        yield


def loading_weights():
    """True inside `weights_to_be_loaded` (initializers may skip random draws)."""
    return getattr(_LOADING, "active", False)


def can_defer_variables():
    """Whether this Keras has the deferred-variable hooks `load_value` uses.

    They are Keras internals (the pending state of a variable created in a
    `keras.StatelessScope`), so they are checked rather than assumed. Not on
    the PyTorch backend: its layers register every variable as a torch
    Parameter as soon as they are built, which needs the value.
    """
    return (
        keras.config.backend() != "torch"
        and hasattr(keras.Variable, "_deferred_initialize")
        and _keras_state_modules() is not None
    )


def is_pending(variable):
    """True for a variable built inside `weights_to_be_loaded` and not yet set."""
    return getattr(variable, "_value", True) is None and getattr(
        variable, "_initializer", None
    ) is not None


def load_value(variable, value, prepared=False):
    """Sets `variable` to the array `value` (same shape; cast to its dtype).

    A pending variable is created from `value` directly; any other is
    assigned. The value is first put in C order and the variable's dtype by
    `backend_value`, unless `prepared` says that `backend_buffer` already
    made it so (on a loader thread: `weights.TensorPrefetch`).
    """
    if prepared:
        value = handover(value)
    else:
        value = backend_value(np.asarray(value), variable.dtype)
    if not is_pending(variable):
        variable.assign(value)
        return
    variable._initializer = lambda shape, dtype=None: value
    variable._deferred_initialize()


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
    modules = _keras_state_modules()
    if not loading_weights() or modules is None or not can_defer_variables():
        yield
        return
    global_state, stateless_scope = modules
    # Inside a caller's own StatelessScope Keras already defers, and its
    # scope must keep initialising what it deferred: leave it alone.
    if stateless_scope.in_stateless_scope():
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


def backend_value(array, dtype):
    """`array` cast to `dtype` in C order, ready to become a variable.

    On TensorFlow it is copied once into fresh memory aligned to 64 bytes
    and handed over through DLPack, so the variable keeps that buffer.
    Given a NumPy array instead, TensorFlow copies it twice (a NumPy copy,
    then an aligned one), and every copy into fresh memory pays its page
    faults (`bench_cpu.py --cold-start-only` measures the load). DLPack
    carries no bfloat16, so a bfloat16 value goes in as a NumPy array.
    Other backends get `c_contiguous` (at most one copy; they copy again
    into their own buffers). The two halves, `backend_buffer` (NumPy only,
    safe on another thread) and `handover`, may also run apart.
    """
    return handover(backend_buffer(array, dtype))


def backend_buffer(array, dtype):
    """The copy half of `backend_value`: NumPy only, so any thread may run it."""
    if keras.config.backend() != "tensorflow":
        return c_contiguous(array, dtype)
    return c_contiguous(array, dtype, out=aligned_empty(array.shape, dtype))


def handover(buffer):
    """The backend half of `backend_value`: TensorFlow takes `buffer` over through DLPack."""
    if keras.config.backend() != "tensorflow":
        return buffer
    import tensorflow as tf

    try:
        return tf.experimental.dlpack.from_dlpack(buffer.__dlpack__())
    except BufferError:  # a dtype DLPack cannot describe (bfloat16)
        return buffer


TILE = 256
# Bytes. TensorFlow's CPU allocator aligns every buffer so, and its kernels
# rely on it: a misaligned DLPack tensor aborts the process in tf.transpose
# ("Check failed: IsAligned()").
ALIGN = 64


def aligned_empty(shape, dtype):
    """An uninitialised C-order array whose data starts on a 64-byte boundary.

    (An array of no elements has no data to align.)
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
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
    for row in range(0, rows, TILE):
        for col in range(0, cols, TILE):
            out[row : row + TILE, col : col + TILE] = array[row : row + TILE, col : col + TILE]
    return out


# === TensorFlow graph details ===


def _tf_control_flow_util():
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return None
    return control_flow_util if hasattr(control_flow_util, "GraphOrParentsInXlaContext") else None


def in_xla_context():
    """Whether TensorFlow is tracing for XLA (`jit_compile=True`) right now.

    Without the helper (a TensorFlow that moved it), answers True: callers
    then take their portable form, which XLA and plain graphs both run.
    """
    import tensorflow as tf

    util = _tf_control_flow_util()
    if util is None:
        return True
    return util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _tf_kernel_registry():
    try:
        from tensorflow.python.framework import kernels, op_def_registry
    except ImportError:
        return None
    if not (hasattr(kernels, "get_registered_kernels_for_op") and hasattr(op_def_registry, "get")):
        return None
    return kernels, op_def_registry


def has_cpu_kernel(op, dtype):
    """Whether TensorFlow registers a CPU kernel of `op` for `dtype` (a `tf.DType`).

    False where the registry cannot be read.
    """
    registry = _tf_kernel_registry()
    if registry is None:
        return False
    kernels, op_def_registry = registry
    if op_def_registry.get(op) is None:
        return False
    enum = dtype.as_datatype_enum
    return any(
        kernel.device_type == "CPU"
        and any(c.name == "T" and enum in c.allowed_values.list.type for c in kernel.constraint)
        for kernel in kernels.get_registered_kernels_for_op(op).kernel
    )


def _tf_is_mkl_enabled():
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return getattr(_pywrap_util_port, "IsMklEnabled", None)


def onednn_enabled():
    """Whether TensorFlow runs oneDNN in this process: True, False, or None where it cannot say.

    TensorFlow decides once, when it starts: on by default on CPUs with
    AVX-512, off on others (AVX2 only), and `TF_ENABLE_ONEDNN_OPTS=1` / `=0`
    overrides it. With it on, TensorFlow rewrites the graph into oneDNN
    kernels (`_MklNativeFusedMatMul`, which also fuses `PointwiseDense`'s
    exact GELU) and honours `TF_ONEDNN_ASSUME_FROZEN_WEIGHTS`; with it off, it
    runs its own kernels (`_FusedMatMul` with the bias only, the GELU as its
    own ops). Imports TensorFlow, whatever the Keras backend. The answer comes
    from a private TensorFlow API (`IsMklEnabled`); None means this
    TensorFlow no longer has it (`missing_hooks` names it).
    """
    is_enabled = _tf_is_mkl_enabled()
    return bool(is_enabled()) if is_enabled is not None else None


def create_graph_op(op, inputs, output_dtypes, attrs):
    """Adds an op with no Python wrapper (an internal kernel) to the current graph.

    Args:
        op: the op type, e.g. "_MklLayerNorm".
        inputs: input tensors.
        output_dtypes: a list of `tf.DType`.
        attrs: `{name: AttrValue}`.

    Returns:
        The op's outputs.
    """
    import tensorflow as tf

    graph = tf.compat.v1.get_default_graph()
    return graph._create_op_internal(op, inputs, output_dtypes, attrs=attrs).outputs


# === Export ===


def _keras_tf2onnx_patch():
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError:
        return None
    return patch_tf2onnx


def patch_tf2onnx():
    """Applies Keras' fixes that let tf2onnx 1.17 run under NumPy 2 (what `model.export` does).

    Returns False where this Keras no longer has them (tf2onnx then runs as released).
    """
    patch = _keras_tf2onnx_patch()
    if patch is None:
        return False
    patch()
    return True


# LiteRT's flatbuffer addresses at most 2 GB. Past that, TensorFlow's
# converter writes the weights after the flatbuffer and points at them by
# offset, but it then still unpacks its whole result into Python objects (to
# de-duplicate buffers and add metadata): for the 2.6 GB of V2 huge that does
# not fit in 24 GB. This flag asks for offsets from the start and skips both.
_LITERT_BUFFER_OFFSET = "_experimental_use_buffer_offset"


def _litert_converter_has_buffer_offsets():
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return hasattr(tf.lite.TFLiteConverter([], None), _LITERT_BUFFER_OFFSET)


def litert_buffer_offsets(converter):
    """Makes a LiteRT `converter` store the weights past the flatbuffer (files over 2 GB).

    Returns False (the converter untouched) where this TensorFlow lacks the flag;
    the caller then refuses the conversion instead of exhausting memory.
    """
    if not hasattr(converter, _LITERT_BUFFER_OFFSET):
        return False
    setattr(converter, _LITERT_BUFFER_OFFSET, True)
    converter.exclude_conversion_metadata = True  # public; metadata needs the unpacking too
    return True


# === torch.export graphs ===


def torch_export_checks():
    """The ops `torch.export` writes only to check a tensor's metadata (empty if gone).

    `torch.export` follows every dtype conversion (`Tensor.to`) with an
    `aten._assert_tensor_metadata` call, hundreds in a ConvNeXt graph; they
    compute nothing, so `inference._lean_graph` drops them. Without them
    listed, the graph keeps them: a little slower, the same outputs.
    """
    import torch

    try:
        return (torch.ops.aten._assert_tensor_metadata.default,)
    except AttributeError:
        return ()


# === keras-hub preprocessing pieces ===


def _preprocessing_pieces():
    try:
        from keras_hub.src.layers.preprocessing.preprocessing_layer import PreprocessingLayer
        from keras_hub.src.utils.tensor_utils import preprocessing_function
    except ImportError:
        return None
    return PreprocessingLayer, preprocessing_function


def _no_conversion(function):
    return function


# keras-hub's base of its preprocessing layers (its `get_config` without the
# image converter's own keys) and the decorator that converts inputs to
# tensors for them. Fallbacks: the plain Keras layer and no conversion (the
# converter then takes TensorFlow tensors and NumPy arrays only).
PreprocessingLayer, preprocessing_function = _preprocessing_pieces() or (
    keras.layers.Layer,
    _no_conversion,
)
