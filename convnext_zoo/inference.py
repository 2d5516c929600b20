"""Fast inference paths: a compiled forward pass, and an OpenVINO snapshot.

`model.predict` pays for Keras' data pipeline and step machinery on every
call. `inference_function` returns a compiled function of one batch
instead, which reads the model's current weights at every call:
`tf.function` on the TensorFlow backend, `jax.jit` of the stateless call on
JAX, a `torch.export` capture of the forward pass run as one graph on
PyTorch (`TorchGraphFunction`). `openvino_function` compiles a copy of the
weights with OpenVINO, the fastest path on CPUs. See benchmarks/bench_cpu.py
for the measurements behind the defaults.
"""

import contextlib
import os
import warnings

import keras
import numpy as np

from convnext_zoo import optional
from convnext_zoo.layers import export_forms, fused_layer_norms

_BACKENDS = ("tensorflow", "jax", "torch")
# OpenVINO's compile settings: tuned for one request at a time, and held to
# float32 (it would otherwise run bfloat16 on CPUs that have it).
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
# keras' default batch size of `predict`.
_DEFAULT_PREDICT_BATCH = 32


class SingleBatchPredict:
    """`predict` of one in-memory batch through `predict_on_batch`.

    `Model.predict` builds a data pipeline (tf.data on TensorFlow) on every
    call, a large share of a small model's time at batch 1. When `x` is a
    single array (or backend tensor) that fits in one batch and no `steps`
    or callbacks are given, the same compiled predict step runs directly on
    it: same outputs, without the pipeline and without the one-step progress
    bar. An explicit `verbose=1` or `2` asks for the progress output, so it
    goes through `Model.predict` too, as does anything else.

    Both trace the predict step inside `fused_layer_norms`: on TensorFlow's
    CPU each layer norm is one oneDNN kernel where TensorFlow has it.
    """

    def predict(self, x=None, batch_size=None, verbose="auto", steps=None, callbacks=None, **kwargs):
        quiet = verbose in ("auto", 0)
        if quiet and steps is None and not callbacks and not kwargs and _one_batch(x, batch_size):
            return self.predict_on_batch(x)
        with fused_layer_norms():
            return super().predict(
                x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks, **kwargs
            )

    def predict_on_batch(self, x):
        with fused_layer_norms():
            return super().predict_on_batch(x)


class PortableExport:
    """`model.export` traced in the layers' export forms (builtin operators only).

    Keras' own exporters trace `model.__call__`; inside
    `convnext_zoo.layers.export_forms` GRN and GELU take forms every format
    can hold (LiteRT has no `EuclideanNorm` and runs `Erf` only as a Flex
    op). Same outputs; every format Keras offers then works.

    On the PyTorch backend, `format="onnx"` goes through `torch_onnx_export`
    (torch's `torch.export`-based exporter, with a dynamic batch) instead of
    Keras 3.15's path, which for a dynamic batch falls back to the
    TorchScript tracer: that one cannot trace a model with trainable weights
    ("Cannot insert a Tensor that requires grad as a constant").
    """

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None,
               **kwargs):
        if keras.config.backend() == "torch" and format == "onnx":
            opset = kwargs.pop("opset_version", None)
            if kwargs:
                raise ValueError(
                    f"The ONNX export from the PyTorch backend takes input_signature and "
                    f"opset_version. Received also: {', '.join(sorted(kwargs))}."
                )
            torch_onnx_export(self, filepath, _signature_shape(self, input_signature), opset=opset)
            if verbose or verbose is None:
                print(f"Saved artifact at '{filepath}'.")
            return None
        with export_forms():
            return super().export(filepath, format=format, verbose=verbose,
                                  input_signature=input_signature, **kwargs)


# The lowest opset torch's exporter writes (it converts to a lower one only
# for some graphs, and leaves the model at 18 when it cannot).
TORCH_ONNX_OPSET = 18


def _signature_shape(model, input_signature):
    """The one input shape of `input_signature` (a spec, tensor or a list of one); the model's by default."""
    if input_signature is None:
        return (None,) + tuple(model.input_shape[1:])
    specs = input_signature
    while isinstance(specs, (list, tuple)) and len(specs) == 1 and not hasattr(specs, "shape"):
        specs = specs[0]
    shape = getattr(specs, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            "A ConvNeXt takes one image batch (batch, height, width, 3). Received: "
            f"input_signature={input_signature!r}. Pass [keras.InputSpec(shape=(None, h, w, 3))] "
            "or leave it out."
        )
    return tuple(None if s is None else int(s) for s in shape)


def torch_onnx_export(model, path, input_shape, opset=None):
    """Writes `model(images, training=False)` on the PyTorch backend as one ONNX file.

    Uses torch's `torch.export`-based exporter (`torch.onnx.export(...,
    dynamo=True)`, which needs `onnxscript`), traced inside
    `convnext_zoo.layers.export_forms`. Each `None` in `input_shape` becomes
    a dynamic dimension of the file (`batch`, `height`, `width`); the
    weights are stored in the file (no external data, so at most 2 GB).
    The graph holds standard ONNX operators only (domain `ai.onnx`).

    Args:
        model: a Keras model on the PyTorch backend, float32.
        path: the `.onnx` file to write.
        input_shape: `(batch, height, width, channels)`, `None` for dynamic.
        opset: the ONNX opset, at least `TORCH_ONNX_OPSET` (18); `None`: 18.

    Raises:
        ValueError: another backend, a lower opset, or a non-float32 model.
        ImportError: torch's exporter needs `onnxscript` (with the pip line).

    Example:
        >>> torch_onnx_export(model, "m.onnx", (None, 224, 224, 3))  # doctest: +SKIP
    """
    backend = keras.config.backend()
    if backend != "torch":
        raise ValueError(
            f"torch_onnx_export traces the PyTorch graph. Received: backend={backend!r}. "
            "Use KERAS_BACKEND=torch, or model.export(path, format='onnx') on this backend."
        )
    opset = TORCH_ONNX_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < TORCH_ONNX_OPSET:
        raise ValueError(
            f"torch's ONNX exporter writes opset {TORCH_ONNX_OPSET} or newer. Received: "
            f"opset={opset!r}. Pass opset=None (or >= {TORCH_ONNX_OPSET}), or export from the "
            "TensorFlow backend (tf2onnx) for an older opset."
        )
    if model.compute_dtype != "float32":
        raise ValueError(
            f"The ONNX export needs a float32 model. Received: dtype policy "
            f"{model.dtype_policy.name!r}. Rebuild it with dtype='float32' and load the weights."
        )
    optional.require("onnxscript", "torch's ONNX exporter (KERAS_BACKEND=torch)")
    import torch

    names = ("batch", "height", "width")
    # A sample of 2, not 1: torch.export specialises dimensions of size 0 and 1.
    sample_shape = [2 if input_shape[0] is None else input_shape[0]]
    sample_shape += [64 if s is None else s for s in input_shape[1:]]
    dynamic = {axis: torch.export.Dim(names[axis], min=1 if axis == 0 else 32)
               for axis in range(3) if input_shape[axis] is None}
    sample = torch.zeros(sample_shape, dtype=torch.float32)
    with torch.no_grad(), export_forms():
        program = torch.onnx.export(
            _inference_module(model), (sample,), input_names=["images"], output_names=["outputs"],
            dynamic_shapes=(dynamic,) if dynamic else None,
            opset_version=opset, dynamo=True, external_data=False, verbose=False,
        )
    program.save(os.fspath(path), external_data=False)


def _inference_module(model):
    """`model(images, training=False)` as the forward of a `torch.nn.Module`, for `torch.export`."""
    import torch

    class Forward(torch.nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, images):
            return self.network(images, training=False)

    return Forward(model).eval()


def _distributed():
    """Inside a distribution (`convnext_zoo.distribute`): `predict_on_batch` would not split the batch."""
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        return tf.distribute.has_strategy()
    return keras.distribution.distribution() is not None


def _one_batch(x, batch_size):
    if _distributed():
        # TensorFlow's replicas would each get the whole batch (the outputs
        # twice); Model.predict splits it.
        return False
    if not (isinstance(x, np.ndarray) or keras.ops.is_tensor(x)) or len(x.shape) == 0:
        return False
    return 0 < x.shape[0] <= (batch_size or _DEFAULT_PREDICT_BATCH)


def inference_function(model, jit_compile=None):
    """Compiles `model(images, training=False)` into a fast batch function.

    On TensorFlow's CPU its layer norms run as one oneDNN kernel each where
    TensorFlow has it (`convnext_zoo.layers.fused_layer_norms`).

    The returned function takes one batch (a NumPy array or a backend tensor,
    float32, `(batch, height, width, 3)` for a ConvNeXt) and returns the
    model's output as a backend tensor; `keras.ops.convert_to_numpy` turns it
    into a NumPy array. It reads the model's current weights on every call
    (later `load_weights` or training steps are seen), and traces once per
    new input shape, so feed a fixed batch size and image size for the best
    speed (pad the last batch). On PyTorch it captures the forward pass with
    `torch.export` once per image size, with a dynamic batch
    (`TorchGraphFunction`: seconds at the first call, see its docstring).

    Args:
        model: a built Keras model, e.g. from `convnext_zoo.from_preset` or
            `create_convnext_v2`. With a preprocessor attached, the function
            runs the network only: feed preprocessed (normalised) images.
        jit_compile: TensorFlow backend only: compile with XLA. `None`
            (default) picks plain `tf.function` graphs with TensorFlow's
            native CPU kernels, measured faster than XLA for ConvNeXt on
            CPUs (XLA's depthwise convolution is slow there). Ignored on
            JAX (always XLA) and PyTorch (the captured graph runs torch's
            eager kernels).

    Returns:
        A callable `f(images) -> outputs`.

    Raises:
        ValueError: if the Keras backend is not one of tensorflow, jax, torch.

    Example:
        >>> import numpy as np, convnext_zoo
        >>> model = convnext_zoo.create_convnext_v2("atto", input_shape=(224, 224, 3))
        >>> predict = convnext_zoo.inference_function(model)
        >>> images = np.zeros((8, 224, 224, 3), "float32")
        >>> logits = keras.ops.convert_to_numpy(predict(images))
        >>> logits.shape
        (8, 1000)
    """
    backend = keras.config.backend()
    if backend == "tensorflow":
        return _tensorflow(model, bool(jit_compile))
    if backend == "jax":
        return _jax(model)
    if backend == "torch":
        return _torch(model)
    raise ValueError(
        f"inference_function supports the Keras backends {', '.join(_BACKENDS)}. "
        f"Received: backend={backend!r}. Set KERAS_BACKEND to one of them "
        "before importing keras."
    )


def _tensorflow(model, jit_compile, fused=True):
    """`model(images, training=False)` in a `tf.function`; with `fused`, its
    layer norms as one oneDNN kernel each where TensorFlow has it (no other
    runtime can run that kernel: OpenVINO's conversion passes `fused=False`)."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
    def forward(images):
        with fused_layer_norms() if fused else contextlib.nullcontext():
            return model(images, training=False)

    def run(images):
        return forward(tf.convert_to_tensor(images, dtype=model.compute_dtype))

    run.concrete_function = forward
    return run


def _jax(model):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def forward(trainable, non_trainable, images):
        outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        return outputs

    def arguments(images):
        # Variables are read per call, so weight updates are always seen.
        return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                jnp.asarray(images, dtype=model.compute_dtype))

    def run(images):
        return forward(*arguments(images))

    run.lower = lambda images: forward.lower(*arguments(images))  # e.g. to read the compiled module
    return run


def _torch(model):
    return TorchGraphFunction(model)


class TorchGraphFunction:
    """`model(images, training=False)` captured by `torch.export`, run as one graph.

    Made by `inference_function` on the PyTorch backend; call it on a batch.
    The first call with a new image shape `(height, width, channels)` (and
    dtype) runs `torch.export.export` of the model's forward under
    `torch.no_grad` (seconds: 4-5 s for V2 atto on 2 shared cores), with a dynamic
    batch: every batch size of that image shape then runs the same graph.
    The `max_captured` most recently used image shapes stay captured.

    The captured graph runs the same torch operators as the Keras call,
    without Keras' per-layer Python (dtype checks, conversions, name scopes)
    and with the no-op operators `torch.export` records dropped
    (`_lean_graph`): each convolution takes its input in place instead of
    through the two full copies Keras makes to switch layouts around it.
    Each `Dense` runs as one `linear` (timm's form). Outputs equal the Keras
    call's to float32 round-off.

    The graph reads the variables' own memory, not a copy: Keras' `assign`
    (`set_weights`, `load_weights`, optimizer steps) writes into it in
    place, so weight changes are seen at the next call. (Code that gives a
    variable's torch tensor new memory outside Keras' `assign` needs a new
    `inference_function`.) Models whose float variables are not in the compute dtype (mixed
    precision: Keras casts each weight per call, a copy a capture would
    freeze) and models `torch.export` cannot capture run the plain call
    under `torch.no_grad` instead; the latter with a warning naming the
    reason.
    """

    max_captured = 4

    def __init__(self, model):
        self._model = model
        self._captured = {}  # (image shape, dtype, device) -> graph module; least recently used first
        self._eager = not _capturable(model)

    def __call__(self, images):
        import torch

        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images)
        if images.ndim < 2:
            raise ValueError(
                f"inference_function takes a batch of images, batch first (for a ConvNeXt "
                f"(batch, height, width, 3)). Received: shape {tuple(images.shape)}. Add the "
                "batch axis, e.g. images[None] for one image."
            )
        with torch.no_grad():
            if self._eager:
                return self._model(images, training=False)
            graph = self._graph(images)
            if graph is None:
                return self._model(images, training=False)
            return graph(images)

    def _graph(self, images):
        key = (tuple(images.shape[1:]), images.dtype, images.device)
        graph = self._captured.pop(key, None)
        if graph is None:
            graph = self._capture(images)
            if graph is None:
                return None
            if len(self._captured) >= self.max_captured:
                self._captured.pop(next(iter(self._captured)))
        self._captured[key] = graph
        return graph

    def _capture(self, images):
        import torch

        # Two samples, not one: torch.export specialises dimensions of size 0 and 1.
        sample = torch.zeros((2,) + tuple(images.shape[1:]), dtype=images.dtype, device=images.device)
        batch = torch.export.Dim("batch", min=1)
        try:
            program = torch.export.export(_inference_module(self._model), (sample,),
                                          dynamic_shapes=({0: batch},))
        except Exception as error:  # torch raises many types for what it cannot trace
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            warnings.warn(
                f"inference_function: torch.export could not capture this model ({type(error).__name__}: "
                f"{reason}); running the plain Keras call instead, which is slower.",
                stacklevel=4,
            )
            self._eager = True
            return None
        graph = program.module()
        _lean_graph(graph)
        return graph


def _capturable(model):
    """Whether `torch.export` would hold the variables themselves, not per-call casts of them."""
    compute = keras.backend.standardize_dtype(model.compute_dtype)
    return all(keras.backend.standardize_dtype(v.dtype) == compute for v in model.variables
               if "float" in keras.backend.standardize_dtype(v.dtype))


def _lean_graph(graph_module):
    """Drops the operators of a `torch.export` graph that leave every value as it is.

    - metadata checks (`internals.torch_export_checks`);
    - `Tensor.to` to the dtype, device and layout the tensor already has
      (Keras' input conversions, a few hundred in a ConvNeXt);
    - the first of two chained `contiguous` calls: Keras' torch convolution
      copies its channels-last input to channels-first memory, then back to
      channels-last memory for torch's fastest kernel. The permuted view of a
      channels-last input already is channels-last memory, so the second call
      alone gives the same tensor with no copy at all.

    and runs a `Dense` layer's matmul and bias add (`matmul(x, kernel) +
    bias`) as one `linear`: the bias enters the matrix product's output
    instead of a second pass over it, as in timm's `nn.Linear` (the same
    sums, rounded in another order: float32 round-off).
    """
    import torch

    from convnext_zoo import internals

    aten = torch.ops.aten
    graph = graph_module.graph
    checks = internals.torch_export_checks()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in checks:
            graph.erase_node(node)
        elif node.target in (aten.to.dtype, aten.to.dtype_layout) and _unchanged_by(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target is aten.contiguous.default and node.kwargs.get("memory_format") is not None:
            inner = node.args[0]
            if (isinstance(inner, torch.fx.Node) and inner.target is aten.contiguous.default
                    and inner.kwargs.get("memory_format", torch.contiguous_format) == torch.contiguous_format
                    and len(inner.users) == 1):
                node.replace_input_with(inner, inner.args[0])
                graph.erase_node(inner)
        elif node.target is aten.add.Tensor and _dense_bias_add(node):
            product, bias = node.args
            with graph.inserting_before(node):
                weight = graph.call_function(aten.t.default, (product.args[1],))
                linear = graph.call_function(aten.linear.default, (product.args[0], weight, bias))
            linear.meta.update(node.meta)
            node.replace_all_uses_with(linear)
            graph.erase_node(node)
            graph.erase_node(product)
    graph.lint()
    graph_module.recompile()


def _dense_bias_add(node):
    """Whether an `add` node is `matmul(x, kernel) + bias` of a `Dense` layer, the product used only there."""
    import torch

    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
        return False
    product, bias = node.args
    if product.target is not torch.ops.aten.matmul.default or len(product.users) != 1:
        return False
    values = [arg.meta.get("val") for arg in (*product.args, bias)]
    if len(values) != 3 or not all(isinstance(v, torch.Tensor) for v in values):
        return False
    inputs, kernel, bias = values
    return (inputs.ndim >= 2 and kernel.ndim == 2 and bias.ndim == 1
            and bias.shape[0] == kernel.shape[1] and inputs.dtype == kernel.dtype == bias.dtype)


def _unchanged_by(node):
    """Whether a `Tensor.to` node returns its input itself (same dtype, device, layout; no copy)."""
    import torch

    aten = torch.ops.aten
    # Only the forms without a copy or memory-format request: `to(x, dtype)`
    # and `to(x, dtype=, layout=, device=)`.
    plain_args = 2 if node.target is aten.to.dtype else 1
    if len(node.args) > plain_args or node.kwargs.get("copy") or node.kwargs.get("memory_format") is not None:
        return False
    source = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    result = node.meta.get("val")
    if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
        return False
    return (source.dtype == result.dtype and source.device == result.device
            and source.layout == result.layout)


def openvino_function(model, num_threads=None):
    """Compiles a snapshot of the model with OpenVINO: the fastest CPU path.

    OpenVINO (Intel's inference runtime, `pip install "convnext_zoo[openvino]"`)
    converts the TensorFlow graph of `model(images, training=False)` once,
    then compiles it for fixed weights and a fixed input shape: the weights
    are packed into its kernels' layouts once, and each block runs through
    its fused kernels. See benchmarks/bench_cpu.py for the speed against
    `inference_function` and timm. Outputs match the Keras model to float32
    round-off: the compiled model is forced to float32 (OpenVINO would
    otherwise pick bfloat16 on CPUs that have it).

    The weights are copied at the call to `openvino_function`: later
    `load_weights`, `set_weights` or training steps are *not* seen; call it
    again after changing them. The first call with a new input shape compiles
    for that shape (1-2 s for ConvNeXt-T at batch 16 on 2 cores: the `first
    call s` column of bench_cpu.py); the last few shapes stay compiled, so
    feed a fixed batch size and image size.

    Args:
        model: a built Keras model on the TensorFlow backend, e.g. from
            `convnext_zoo.from_preset`. With a preprocessor attached, the
            function runs the network only: feed preprocessed images.
        num_threads: CPU threads for OpenVINO; `None` lets it use every core.

    Returns:
        An `OpenVINOFunction`: `f(images) -> np.ndarray` (a list of arrays for
        a model with several outputs), for float32 NumPy arrays or tensors.

    Raises:
        ValueError: on another Keras backend, for `num_threads` < 1, or for a
            graph OpenVINO cannot convert (e.g. a mixed_bfloat16 model).
        ImportError: if OpenVINO is not installed, with the command to install it.

    Example:
        >>> import numpy as np, convnext_zoo
        >>> model = convnext_zoo.create_convnext_v2("atto", input_shape=(224, 224, 3))
        >>> predict = convnext_zoo.openvino_function(model)  # doctest: +SKIP
        >>> predict(np.zeros((8, 224, 224, 3), "float32")).shape  # doctest: +SKIP
        (8, 1000)
    """
    backend = keras.config.backend()
    if backend != "tensorflow":
        raise ValueError(
            "openvino_function converts the model's TensorFlow graph, so it needs the "
            f"tensorflow Keras backend. Received: backend={backend!r}. Save the weights "
            "(model.save_weights or save_to_preset) and load them in a process started "
            "with KERAS_BACKEND=tensorflow, or use inference_function on this backend."
        )
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(
            f"num_threads must be a positive int or None. Received: num_threads={num_threads!r}."
        )
    ov, converted = convert_to_openvino(model)
    config = dict(OPENVINO_CONFIG)
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = num_threads
    return OpenVINOFunction(ov, converted, config)


def convert_to_openvino(model):
    """`(openvino module, converted ov.Model)` of `model(images, training=False)`.

    The conversion behind `openvino_function` (TensorFlow backend), with a
    copy of the weights and any batch size; `benchmarks/profile_ops.py`
    compiles it with OpenVINO's per-op profiling.

    Raises:
        ValueError: for a graph OpenVINO cannot convert, with the reason.
        ImportError: if OpenVINO is not installed.
    """
    ov = optional.require("openvino", "openvino_function")
    import tensorflow as tf

    forward = _tensorflow(model, jit_compile=False, fused=False).concrete_function
    # Float32 images in, as `OpenVINOFunction` feeds them; the model casts them itself.
    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), "float32")
    # A copy of the weights: by default OpenVINO would point at TensorFlow's
    # buffers, which set_weights or training frees or overwrites.
    try:
        return ov, ov.convert_model(forward.get_concrete_function(spec), share_weights=False)
    except Exception as error:  # OpenVINO raises its own error types
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
        # OpenVINO lists what it could not convert on lines starting with "--".
        reason = "; ".join(line.lstrip("- ") for line in lines if line.startswith("--")) or lines[0]
        raise ValueError(
            "OpenVINO could not convert this model's graph (dtype policy "
            f"{model.dtype_policy.name!r}): {reason}. Models in "
            "float32 or mixed_float16 convert; for others use inference_function, or "
            "rebuild the model in float32 and load its weights."
        ) from error


class OpenVINOFunction:
    """A converted model, compiled by OpenVINO once per input shape.

    Made by `openvino_function`; call it on a batch of images. A compiled
    shape holds its own packed copy of the weights, so only the
    `max_compiled` most recently used shapes are kept.
    """

    max_compiled = 4

    def __init__(self, ov, converted, config):
        self._ov = ov
        self._core = ov.Core()
        self._model = converted
        self._config = dict(config)
        self._input_shape = converted.input(0).get_partial_shape()
        self._compiled = {}  # shape -> infer request, least recently used first

    @property
    def input_shape(self):
        """The accepted input shape; `None` where any size goes."""
        return tuple(None if d.is_dynamic else d.get_length() for d in self._input_shape)

    def __call__(self, images):
        images = np.ascontiguousarray(keras.ops.convert_to_numpy(images), dtype=np.float32)
        if not self._input_shape.compatible(self._ov.PartialShape(list(images.shape))):
            raise ValueError(
                f"This model takes images of shape {self.input_shape} (None: any size), "
                f"batch first and channels last. Received: shape {images.shape}. Resize "
                "the images, or build the model with input_shape=(None, None, 3) for any size."
            )
        request = self._request(images.shape)
        outputs = request.infer({0: images})
        arrays = [np.array(outputs[output]) for output in request.model_outputs]
        return arrays[0] if len(arrays) == 1 else arrays

    def _request(self, shape):
        request = self._compiled.pop(shape, None)
        if request is None:
            model = self._model.clone()
            model.reshape(list(shape))
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            if len(self._compiled) >= self.max_compiled:
                self._compiled.pop(next(iter(self._compiled)))
        self._compiled[shape] = request
        return request
