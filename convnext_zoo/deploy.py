"""Deployment exports: LiteRT, ONNX, SavedModel and OpenVINO files, verified before they land.

`convnext_zoo.export` is this module's `export` (the module is not named
`export` so that the package attribute stays the function).

`export` traces the model once on the TensorFlow backend inside
`layers.export_forms()` (GRN and the exact GELU in builtin operators only),
converts that graph to the chosen format next to the destination, runs the
converted file in its own runtime on photographs against the Keras model,
and only then renames it into place. A failed conversion or a failed check
leaves nothing behind, and an existing path is replaced only with
`overwrite=True`. On the PyTorch backend it writes ONNX (torch's
`torch.export`-based exporter, `inference.torch_onnx_export`, opset 18),
checked the same way.

Full int8 LiteRT (`quantize="int8"`): every layer runs in int8 except the
GRN's square (`SQUARE`, one per block: LiteRT has no int8 kernel for it), which
runs in float32 between a `DEQUANTIZE` and a `QUANTIZE`; the report lists such
operators under `float_ops` (`litert_float_ops`). The layer norms (`MEAN`,
`SQUARED_DIFFERENCE`, `RSQRT`) and the GRN's sum, square root and division are
int8. Checked on V2 atto at 224 px, random weights, five photographs: relative
logit error 2.3e-2, top-1 unchanged; keeping the GRN and layer-norm operators
float as well (the converter's selective quantisation) only brought it to
1.3e-2, so the export does not do it. On V2 atto fine-tuned on the digits
(`benchmarks/quantize_digits.py`), full int8 keeps the float32 model's top-1
on all 359 held-out digits (99.16% accuracy) at a relative logit error of
9.3e-2 (mean 5.3e-2; norms kept float: 4.5e-2).

Runtimes used to check each format (the `export` extra installs them):
LiteRT: `ai-edge-litert`'s interpreter (builtin operators, no Flex delegate);
ONNX: onnxruntime; SavedModel: TensorFlow; OpenVINO: OpenVINO.
"""

import logging
import mmap
import os
import shutil
import tempfile
import time

import numpy as np

from convnext_zoo import optional
from convnext_zoo.variants import suggest

# Keras is imported inside the functions: the command line checks its
# arguments with `check_options` before loading it.

logger = logging.getLogger("convnext_zoo")

FORMATS = ("litert", "onnx", "saved_model", "openvino")
QUANTIZATIONS = ("float16", "dynamic_int8", "int8")
# Which quantisations each format offers.
FORMAT_QUANTIZATIONS = {"litert": QUANTIZATIONS, "onnx": ("dynamic_int8",),
                        "saved_model": (), "openvino": ()}
# The file a format writes (the others write a directory).
SUFFIXES = {"litert": ".tflite", "onnx": ".onnx"}
# Relative logit error (max |diff| / max |reference|) accepted by the check.
TOLERANCES = {None: 1e-4, "float16": 1e-2}
# Below this top-1 agreement with the float32 model, a quantised export is
# reported as degraded (a warning, with the figures).
MIN_QUANTIZED_AGREEMENT = 0.75
ONNX_OPSET = 17
# The four photographs shipped in the package (verification.py's), so the
# default works for an installed package as well as in a checkout.
DEFAULT_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "images")
INSTALL_EXPORT = 'pip install "convnext_zoo[export]"'
_RUNTIMES = {
    "litert": ("ai_edge_litert", "ai-edge-litert"),
    "onnx": ("onnxruntime", None),  # the packages depend on the backend
    "openvino": ("openvino", "openvino"),
}


class ExportError(ValueError):
    """An export that cannot be made or failed its check; the message says what to change."""


def export(model_or_preset, path, format="litert", quantize=None, batch_size=None, image_size=None,
           include_preprocessing=False, representative_images=None, overwrite=False,
           opset=None):
    """Exports a ConvNeXt for deployment and checks the file against the Keras model.

    Args:
        model_or_preset: a model of this package, or anything
            `convnext_zoo.from_preset` accepts (a name, `hf://` handle or
            preset directory). Every format from the TensorFlow backend;
            ONNX from the PyTorch backend too (torch's exporter).
        path: the destination: a `.tflite` file (litert), an `.onnx` file
            (onnx), or a directory (saved_model; openvino writes
            `model.xml` and `model.bin` into it).
        format: "litert", "onnx", "saved_model" or "openvino".
        quantize: `None` (float32), or for litert "float16" (half the
            file), "dynamic_int8" (int8 weights) or "int8" (weights and
            activations, calibrated on `representative_images`; layer norms
            and GRN may stay float where the converter keeps them so); onnx
            offers "dynamic_int8".
        batch_size: a fixed batch size; `None` leaves it dynamic.
        image_size: `(height, width)` of the network input (a preset is
            built for it; a model must already accept it). With
            `include_preprocessing`, the size of the raw images instead
            (`None`: any size, where the format allows it).
        include_preprocessing: the graph takes uint8 RGB images and applies
            the preset's evaluation transform (resize, center crop,
            normalise) before the network.
        representative_images: uint8 RGB images `(n, h, w, 3)` (or a list of
            `(h, w, 3)`), raw photographs: the int8 calibration set, and the
            images the check runs on. Default: the four photographs shipped
            in the package (`convnext_zoo/data/images`).
        overwrite: replace an existing `path`.
        opset: the ONNX opset; `None`: 17 from TensorFlow (tf2onnx), 18
            from PyTorch (the lowest torch's exporter writes).

    Returns:
        A dict: `path`, `format`, `quantize`, `bytes`, `input_shape`,
        `input_dtype`, `images`, `max_abs`, `relative` (max |diff| over max
        |logit|), `top1_agreement`, `tolerance`, `seconds`, and per format
        `opset` / `ops`; for int8 LiteRT `float_ops` (`{operator: count}`
        of the operators left in float32).

    Raises:
        ExportError: bad arguments, or an export that failed its check.
        ImportError: a runtime of the format is missing (with the pip line).

    Example:
        >>> convnext_zoo.export("convnext_v2_atto", "atto.tflite")  # doctest: +SKIP
        {'path': 'atto.tflite', 'bytes': 14893328, 'relative': 3.1e-07, ...}
    """
    import keras

    start = time.perf_counter()
    fmt, quantize = check_options(format, quantize, path, overwrite, batch_size, image_size)
    backend = keras.config.backend()
    if backend != "tensorflow" and not (backend == "torch" and fmt == "onnx"):
        raise ExportError(
            f"convnext_zoo.export writes {fmt} from the TensorFlow backend"
            + ("" if fmt == "onnx" else " only") + " (ONNX also from PyTorch). Received: Keras "
            f"backend {backend!r}. Run it with KERAS_BACKEND=tensorflow"
            + (" or KERAS_BACKEND=torch." if fmt == "onnx" else ".")
        )
    if backend == "torch" and include_preprocessing:
        raise ExportError(
            "include_preprocessing traces the evaluation transform in TensorFlow, and this is the "
            "PyTorch backend. Export the network alone (include_preprocessing=False), or run with "
            "KERAS_BACKEND=tensorflow."
        )
    _require_runtime(fmt, backend)
    model = _load(model_or_preset, image_size, include_preprocessing)
    converter = _converter(model, include_preprocessing)
    photos = _photographs(representative_images, quantize)
    network_size = tuple(model.input_shape[1:3])
    if include_preprocessing:
        input_size = tuple(image_size) if image_size else (None, None)
    else:
        input_size = network_size
    if include_preprocessing and fmt != "saved_model" and None in input_size:
        raise ExportError(
            f"A {fmt} export with the preprocessing in the graph needs the raw image size: its "
            "resize is built for one size. Pass --image-size H W (image_size=(h, w)), or use "
            "format='saved_model' for any size."
        )
    if include_preprocessing and fmt == "litert" and batch_size is None:
        raise ExportError(
            "A LiteRT export with the preprocessing in the graph needs a fixed batch size (its "
            "resize is two matrix products, which LiteRT cannot size for a dynamic batch). "
            "Pass --batch-size N (batch_size=n)."
        )
    if fmt == "litert" and None in input_size:
        flag = "--image-size H W (image_size=(h, w))"
        raise ExportError(
            "LiteRT needs a static image size, and this "
            + ("preprocessing graph takes any size" if include_preprocessing
               else f"model takes any size (input shape {model.input_shape})")
            + f". Pass {flag}."
        )
    spec_shape = (batch_size,) + tuple(input_size) + (3,)
    spec_dtype = "uint8" if include_preprocessing else "float32"
    if backend == "torch":
        forward, writer = None, _write_onnx_torch
    else:
        forward, writer = _forward(model, converter if include_preprocessing else None), _WRITERS[fmt]

    # Inputs of the check: raw photographs through the graph's own input.
    if include_preprocessing:
        feed = _resize_raw(photos, input_size)
        reference = _keras_outputs(model, converter(feed) if input_size[0] else converter(list(feed)))
    else:
        feed = _network_inputs(photos, network_size, converter)
        reference = _keras_outputs(model, feed)

    destination = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.", dir=parent)
    try:
        target = os.path.join(aside, os.path.basename(destination))
        info = writer(forward, spec_shape, spec_dtype, target, quantize, opset,
                      model=model, calibration=feed)
        outputs = _RUNNERS[fmt](target, feed, batch_size)
        report = _compare(outputs, reference, quantize)
        report.update(info)
        report.update({
            "format": fmt, "quantize": quantize, "bytes": _size(target),
            "input_shape": list(spec_shape), "input_dtype": spec_dtype,
            "images": len(feed), "backend": backend,
        })
        _judge(report)
        _move_into_place(target, destination, overwrite, aside)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    report["path"] = os.fspath(path)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


# === Arguments ===


def check_options(fmt, quantize, path, overwrite, batch_size, image_size):
    """Validates `export`'s arguments without loading Keras; returns `(format, quantize)`."""
    if fmt not in FORMATS:
        raise ExportError(
            f"Unknown export format. Received: format={fmt!r}.{suggest(fmt, FORMATS)} "
            f"Valid: {', '.join(FORMATS)}."
        )
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(
            f"Unknown quantisation. Received: quantize={quantize!r}."
            f"{suggest(quantize, QUANTIZATIONS)} Valid: None, {', '.join(QUANTIZATIONS)}."
        )
    if quantize is not None and quantize not in FORMAT_QUANTIZATIONS[fmt]:
        offered = FORMAT_QUANTIZATIONS[fmt]
        raise ExportError(
            f"format={fmt!r} has no quantize={quantize!r}; it offers "
            + (", ".join(offered) if offered else "float32 only (quantize=None)")
            + ". Use format='litert' for float16, dynamic_int8 and int8."
        )
    suffix = SUFFIXES.get(fmt)
    if suffix and not os.fspath(path).endswith(suffix):
        raise ExportError(
            f"A {fmt} export is one file ending in {suffix!r}. Received: path={os.fspath(path)!r}. "
            f"Example: model{suffix}."
        )
    if os.path.lexists(path) and not overwrite:
        raise ExportError(
            f"{os.fspath(path)} already exists; pass overwrite=True (--overwrite) to replace it."
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ExportError(
            f"batch_size must be a positive int or None (dynamic). Received: batch_size={batch_size!r}."
        )
    if image_size is not None and (
        not isinstance(image_size, (tuple, list)) or len(image_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 for s in image_size)
    ):
        raise ExportError(
            f"image_size must be (height, width), ints >= 32. Received: image_size={image_size!r}. "
            "Example: (224, 224)."
        )
    return fmt, quantize


def _require_runtime(fmt, backend="tensorflow"):
    module, packages = _RUNTIMES.get(fmt, (None, None))
    needed = [module] if module else []
    if fmt == "onnx":
        # The converter: tf2onnx from TensorFlow, torch's exporter (onnxscript) from PyTorch.
        converter = "onnxscript" if backend == "torch" else "tf2onnx"
        needed += ["onnx", converter]
        packages = f"onnx onnxruntime {converter}"
    for name in needed:
        try:
            __import__(name)
        except ImportError as error:
            raise ImportError(
                f"Exporting to {fmt} needs the optional package '{name}' ({error}). Install it "
                f"with: {INSTALL_EXPORT}  (or: pip install {packages})"
            ) from None


def _load(model_or_preset, image_size, include_preprocessing):
    import keras

    if isinstance(model_or_preset, keras.Model):
        model = model_or_preset
        if image_size and not include_preprocessing:
            static = tuple(model.input_shape[1:3])
            if static != tuple(image_size) and None not in static:
                raise ExportError(
                    f"This model is built for {static[0]}x{static[1]} images. Received: "
                    f"image_size={tuple(image_size)!r}. Build it with input_shape=(None, None, 3) "
                    "(or the size you want), or pass the preset name so it is rebuilt."
                )
            if None in static:
                model = _fixed_size(model, image_size)
        return model
    import convnext_zoo

    options = {}
    if image_size and not include_preprocessing:
        options["input_shape"] = (int(image_size[0]), int(image_size[1]), 3)
    return convnext_zoo.from_preset(model_or_preset, **options)


def _fixed_size(model, image_size):
    """A model with a dynamic image size, traced at `image_size` (same weights)."""
    import keras

    inputs = keras.Input((int(image_size[0]), int(image_size[1]), 3), dtype=model.input.dtype)
    fixed = keras.Model(inputs, model(inputs), name=model.name)
    fixed.preprocessor = getattr(model, "preprocessor", None)
    return fixed


def _converter(model, include_preprocessing):
    """The model's image converter; a default one for a model without."""
    from convnext_zoo.preprocessing import ConvNeXtImageConverter

    preprocessor = getattr(model, "preprocessor", None)
    converter = getattr(preprocessor, "image_converter", None)
    if converter is not None:
        return converter
    if include_preprocessing:
        raise ExportError(
            "include_preprocessing needs the preset's evaluation transform, and this model has "
            "no preprocessor. Export a preset (convnext_zoo.from_preset attaches it), or set "
            "model.preprocessor = ConvNeXtImageClassifierPreprocessor(ConvNeXtImageConverter(...))."
        )
    return ConvNeXtImageConverter(image_size=tuple(int(s) for s in model.input_shape[1:3])
                                  if None not in model.input_shape[1:3] else 224)


def _photographs(images, quantize):
    """uint8 RGB photographs: the caller's, or the repository's test images."""
    if images is None:
        from PIL import Image

        files = (sorted(f for f in os.listdir(DEFAULT_IMAGES) if f.endswith((".jpg", ".png")))
                 if os.path.isdir(DEFAULT_IMAGES) else [])
        if not files:
            raise ExportError(
                f"The export is checked on photographs, and the package's own ({DEFAULT_IMAGES}) "
                "are missing. Pass representative_images=<uint8 array (n, h, w, 3)>."
            )
        return [np.asarray(Image.open(os.path.join(DEFAULT_IMAGES, f)).convert("RGB")) for f in files]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    arrays = list(images) if isinstance(images, (list, tuple, np.ndarray)) else None
    problems = []
    if not arrays:
        problems.append(f"type {type(images).__name__}" if arrays is None else "no images")
    for i, image in enumerate(arrays or []):
        image = np.asarray(image)
        if image.dtype != np.uint8:
            problems.append(f"image {i} has dtype {image.dtype}")
        elif image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
            problems.append(f"image {i} has shape {image.shape}")
        if problems:
            break
    if problems:
        raise ExportError(
            "representative_images must be raw RGB photographs, uint8, (n, h, w, 3) or a list of "
            f"(h, w, 3). Received: {problems[0]}. Pass pixel values 0-255 before any normalisation."
        )
    if quantize == "int8" and len(arrays) < 4:
        raise ExportError(
            f"int8 calibration needs at least 4 representative images. Received: {len(arrays)}."
        )
    return [np.asarray(a) for a in arrays]


def _resize_raw(photos, size):
    """Raw photographs at one size (PIL bicubic), or as they are for a dynamic-size graph."""
    from PIL import Image

    if size[0] is None:
        return np.stack([np.asarray(Image.fromarray(p).resize((320, 240), Image.BICUBIC))
                         for p in photos])
    return np.stack([np.asarray(Image.fromarray(p).resize((size[1], size[0]), Image.BICUBIC))
                     for p in photos])


def _network_inputs(photos, size, converter):
    """Photographs through the evaluation transform, at the network's input size."""
    from convnext_zoo.preprocessing import ConvNeXtImageConverter

    if None in size:
        size = converter.image_size
    config = dict(converter.get_config(), image_size=tuple(size))
    config.pop("name", None)
    config.pop("dtype", None)
    sized = ConvNeXtImageConverter.from_config(config)
    return np.stack([np.asarray(sized(p), np.float32) for p in photos])


def _keras_outputs(model, images):
    import keras

    images = keras.ops.convert_to_numpy(images).astype(np.float32)
    return np.concatenate([keras.ops.convert_to_numpy(model(images[i:i + 8], training=False))
                           for i in range(0, len(images), 8)])


# === The traced graph ===


def _forward(model, converter):
    """`images -> outputs` for tracing, with the preprocessing in front when given."""
    import tensorflow as tf

    from convnext_zoo.layers import export_forms

    def forward(images):
        with export_forms():
            if converter is not None:
                static = images.shape[1] is not None and images.shape[2] is not None
                images = (static_transform(converter, images) if static else converter(images))
            return model(tf.cast(images, model.compute_dtype), training=False)

    return forward


def resize_matrix(converter, size, resized):
    """The `(resized, size)` matrix of the converter's 1-D resize (`tf.image.resize` is separable).

    Row `o` holds the weights of output pixel `o` over the input pixels: the
    resize of each unit vector, computed by TensorFlow itself.
    """
    import tensorflow as tf

    with tf.init_scope():  # eagerly, also while a graph is being traced
        basis = tf.eye(size, dtype=tf.float32)[None, :, None, :]  # (1, size, 1, size)
        columns = tf.image.resize(basis, [resized, 1], method=converter.interpolation,
                                  antialias=converter.antialias)
        return columns[0, :, 0, :].numpy()


def static_transform(converter, images):
    """The converter's evaluation transform for a static image size, in builtin operators.

    The antialiased resize (`ScaleAndTranslate`, neither a LiteRT builtin nor
    an ONNX operator) becomes two matrix products with constant matrices
    (the resize and the center crop of rows, then of columns); rounding,
    clipping and normalisation follow as in `ConvNeXtImageConverter`.
    """
    import tensorflow as tf

    height, width = int(images.shape[1]), int(images.shape[2])
    new_h, new_w = converter.resized_size(height, width)
    out_h, out_w = converter.image_size
    top, left = int(round((new_h - out_h) / 2)), int(round((new_w - out_w) / 2))
    rows = resize_matrix(converter, height, new_h)[top:top + out_h]
    cols = resize_matrix(converter, width, new_w)[left:left + out_w]
    x = tf.cast(images, tf.float32)
    x = tf.einsum("oh,bhwc->bowc", tf.constant(rows), x)
    x = tf.einsum("pw,bowc->bopc", tf.constant(cols), x)
    if converter.quantize:
        x = tf.clip_by_value(tf.round(x), 0.0, 255.0)
    return x * tf.constant(converter.scale, tf.float32) + tf.constant(converter.offset, tf.float32)


def _concrete(forward, shape, dtype):
    import tensorflow as tf

    function = tf.function(forward, autograph=False)
    return function, function.get_concrete_function(tf.TensorSpec(shape, dtype, name="images"))


# Above this many bytes of float32 weights the LiteRT file is written with
# its weights after the flatbuffer (offsets), since a flatbuffer addresses at
# most 2 GB (the graph itself takes some of it). Smaller files keep the
# classic layout, which every LiteRT runtime reads.
LITERT_OFFSET_BYTES = int(1.8 * 2**30)


def _weight_bytes(model):
    return sum(int(np.prod(v.shape)) * 4 for v in model.weights)


def _write_litert(forward, shape, dtype, target, quantize, opset, model, calibration):
    import tensorflow as tf

    from convnext_zoo import internals

    # Through a SavedModel, as Keras' own LiteRT export: the converter then
    # freezes the variables into constants.
    saved = target + ".saved_model"
    _write_saved_model(forward, shape, dtype, saved, None, opset, model, calibration)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    # Builtin operators only: no Flex (SELECT_TF_OPS), no custom ops.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize is None and _weight_bytes(model) > LITERT_OFFSET_BYTES:
        if not internals.litert_buffer_offsets(converter):
            shutil.rmtree(saved, ignore_errors=True)
            raise ExportError(
                f"The float32 weights ({_weight_bytes(model) / 2**30:.1f} GiB) exceed a LiteRT "
                "flatbuffer's 2 GB, and this TensorFlow's converter lacks the buffer-offset mode "
                "that writes larger files. Export with quantize='float16' (half the size), or "
                "format='onnx'.")
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        samples = np.asarray(calibration)

        def representative():
            for sample in samples:
                yield [sample[None].astype(dtype)]

        converter.representative_dataset = representative
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # the converter raises its own types
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()] or [repr(error)]
        raise ExportError(f"The LiteRT converter failed: {lines[0]}") from error
    finally:
        shutil.rmtree(saved, ignore_errors=True)
    with open(target, "wb") as file:
        file.write(flatbuffer)
    ops = litert_operators(target)
    foreign = [op for op in ops if not op.isupper() or op.startswith(("FLEX", "CUSTOM"))]
    if foreign:
        raise ExportError(f"The LiteRT file holds non-builtin operators: {', '.join(foreign)}.")
    info = {"ops": ops}
    if quantize == "int8":
        info["float_ops"] = litert_float_ops(target)
    return info


def litert_operators(path):
    """The operator names of a `.tflite` file, from its flatbuffer (custom ops by their code).

    A Flex op is a custom op whose code starts with "Flex"; builtins are
    upper case (`CONV_2D`, `GELU`, ...).
    """
    from ai_edge_litert import schema_py_generated as schema

    names = {value: name for name, value in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    ops = set()
    # Mapped and read in place: only the operator table is touched, not the
    # (up to gigabytes of) weights.
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = schema.Model.GetRootAsModel(data, 0)
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == schema.BuiltinOperator.CUSTOM:
                ops.add(f"custom:{code.CustomCode().decode()}")
            else:
                ops.add(names[builtin])
    return sorted(ops)


def litert_float_ops(path):
    """`{operator: count}` of the operators of a `.tflite` file that compute in float32.

    An operator counts when one of its inputs is a float32 tensor, except
    `QUANTIZE` (the float-to-int8 boundary itself). In a full-int8 file these
    are the layers the converter left in float (it has no int8 kernel for
    them), each between a `DEQUANTIZE` and a `QUANTIZE`.
    """
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as file:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(file.read(), 0))
    names = {value: name for name, value in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    counts = {}
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            code = model.operatorCodes[operator.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            inputs = [subgraph.tensors[i] for i in operator.inputs if i >= 0]
            if name != "QUANTIZE" and any(t.type == schema.TensorType.FLOAT32 for t in inputs):
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def litert_interpreter(path, num_threads=None, xnnpack=True):
    """The plain `ai-edge-litert` interpreter of a file (no Flex delegate), tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = (OpResolverType.AUTO if xnnpack
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter = Interpreter(model_path=path, num_threads=num_threads,
                              experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter


def run_litert(interpreter, images):
    """One batch through a LiteRT interpreter (resized to the batch when its batch is dynamic)."""
    detail = interpreter.get_input_details()[0]
    if tuple(detail["shape"]) != images.shape:
        interpreter.resize_tensor_input(detail["index"], list(images.shape))
        interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], np.ascontiguousarray(images, detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _batched(run, images, batch_size):
    """`run` over `images` in batches of `batch_size` (the last padded); all at once for None."""
    if batch_size is None:
        return np.asarray(run(images))
    outputs = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outputs.append(np.asarray(run(chunk))[:batch_size - pad])
    return np.concatenate(outputs)


def _run_litert(target, images, batch_size):
    interpreter = litert_interpreter(target)
    return _batched(lambda x: run_litert(interpreter, x).copy(), images, batch_size)


def _write_onnx(forward, shape, dtype, target, quantize, opset, model, calibration):
    import tensorflow as tf

    from convnext_zoo import internals

    internals.patch_tf2onnx()
    import tf2onnx

    function, _ = _concrete(forward, shape, dtype)
    plain = target + ".float.onnx" if quantize else target
    try:
        tf2onnx.convert.from_function(
            function, input_signature=[tf.TensorSpec(shape, dtype, name="images")],
            opset=ONNX_OPSET if opset is None else opset, output_path=plain,
        )
    except Exception as error:
        raise ExportError(f"tf2onnx could not convert the graph: {error}") from error
    return _quantize_onnx(plain, target, quantize)


def _write_onnx_torch(forward, shape, dtype, target, quantize, opset, model, calibration):
    """ONNX from the PyTorch backend: torch's exporter (`inference.torch_onnx_export`)."""
    from convnext_zoo.inference import torch_onnx_export

    plain = target + ".float.onnx" if quantize else target
    try:
        torch_onnx_export(model, plain, shape, opset=opset)
    except (ValueError, ImportError):
        raise
    except Exception as error:  # torch.export raises its own types
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()] or [repr(error)]
        raise ExportError(f"torch's ONNX exporter could not convert the model: {lines[0]}") from error
    return _quantize_onnx(plain, target, quantize)


def _quantize_onnx(plain, target, quantize):
    """Quantises `plain` into `target` (onnxruntime's dynamic int8) when asked; the file's facts."""
    if quantize == "dynamic_int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(plain, target, weight_type=QuantType.QInt8)
        os.remove(plain)
    return onnx_facts(target)


def onnx_facts(path):
    """`{"opset": n, "ops": [...], "domains": [...]}` of an ONNX file; refuses custom domains."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    domains = sorted({o.domain or "ai.onnx" for o in proto.opset_import})
    custom = [d for d in domains if d not in ("ai.onnx", "com.microsoft", "ai.onnx.ml")]
    if custom:
        raise ExportError(f"The ONNX file uses custom operator domains: {', '.join(custom)}.")
    ops = sorted({node.op_type for node in proto.graph.node})
    return {"opset": opset, "ops": ops, "domains": domains}


def _run_onnx(target, images, batch_size):
    import onnxruntime

    session = onnxruntime.InferenceSession(target, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _batched(lambda x: session.run(None, {name: x})[0], images, batch_size)


def _write_saved_model(forward, shape, dtype, target, quantize, opset, model, calibration):
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", forward, input_signature=[tf.TensorSpec(shape, dtype, name="images")])
    archive.write_out(target, verbose=False)
    return {"signature": "serve"}


def _run_saved_model(target, images, batch_size):
    import tensorflow as tf

    loaded = tf.saved_model.load(target)
    return _batched(lambda x: loaded.serve(tf.constant(x)).numpy(), images, batch_size)


def _write_openvino(forward, shape, dtype, target, quantize, opset, model, calibration):
    ov = optional.require("openvino", "Exporting to OpenVINO")
    _, concrete = _concrete(forward, shape, dtype)
    try:
        converted = ov.convert_model(concrete, share_weights=False)
    except Exception as error:
        raise ExportError(f"OpenVINO could not convert the graph: {error}") from error
    os.makedirs(target)
    ov.save_model(converted, os.path.join(target, "model.xml"), compress_to_fp16=False)
    return {"files": ["model.xml", "model.bin"]}


def _run_openvino(target, images, batch_size):
    from convnext_zoo.inference import OPENVINO_CONFIG

    ov = optional.require("openvino", "Checking an OpenVINO export")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(os.path.join(target, "model.xml")), "CPU",
                                  OPENVINO_CONFIG)
    return _batched(lambda x: compiled(x)[0], images, batch_size)


_WRITERS = {"litert": _write_litert, "onnx": _write_onnx, "saved_model": _write_saved_model,
            "openvino": _write_openvino}
_RUNNERS = {"litert": _run_litert, "onnx": _run_onnx, "saved_model": _run_saved_model,
            "openvino": _run_openvino}


# === Check and move ===


def _compare(outputs, reference, quantize):
    outputs = np.asarray(outputs, np.float64).reshape(reference.shape)
    reference = np.asarray(reference, np.float64)
    max_abs = float(np.abs(outputs - reference).max())
    report = {
        "max_abs": max_abs,
        "relative": max_abs / max(float(np.abs(reference).max()), 1e-12),
        "tolerance": TOLERANCES.get(quantize),
    }
    if reference.ndim == 2:
        report["top1_agreement"] = float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))
    return report


def _judge(report):
    tolerance = report["tolerance"]
    if tolerance is not None and not report["relative"] <= tolerance:
        raise ExportError(
            f"The {report['format']} export differs from the Keras model on {report['images']} "
            f"photographs: relative logit error {report['relative']:.2e} > {tolerance:.0e} "
            f"(max |diff| {report['max_abs']:.3g}). Nothing was written."
        )
    agreement = report.get("top1_agreement")
    if tolerance is None and agreement is not None and agreement < MIN_QUANTIZED_AGREEMENT:
        logger.warning(
            "%s %s export: top-1 agrees with float32 on %.0f%% of %d photographs only "
            "(relative logit error %.2e).", report["format"], report["quantize"],
            100 * agreement, report["images"], report["relative"],
        )


def _size(target):
    if os.path.isfile(target):
        return os.path.getsize(target)
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(target) for f in files)


def _move_into_place(target, destination, overwrite, aside):
    if os.path.lexists(destination):
        if not overwrite:
            raise ExportError(f"{destination} appeared during the export; pass overwrite=True.")
        # Old output into the scratch directory (removed with it), new one in.
        os.replace(destination, os.path.join(aside, ".previous"))
    os.replace(target, destination)
